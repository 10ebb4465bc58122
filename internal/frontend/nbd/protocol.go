package nbd

// Wire constants of the NBD protocol (fixed newstyle negotiation, simple
// replies). All integers on the wire are big-endian.

const (
	magicInit     uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt      uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply uint64 = 0x3e889045565a9
	magicRequest  uint32 = 0x25609513
	magicReply    uint32 = 0x67446698 // simple reply
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	clientFixedNewstyle uint32 = 1 << 0
	clientNoZeroes      uint32 = 1 << 1
	clientKnownFlags           = clientFixedNewstyle | clientNoZeroes
)

// Transmission flags.
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagCanMultiConn    uint16 = 1 << 8
)

// Options.
const (
	optExportName uint32 = 1
	optAbort      uint32 = 2
	optList       uint32 = 3
	optStartTLS   uint32 = 5
	optInfo       uint32 = 6
	optGo         uint32 = 7
)

// Option reply types.
const (
	repAck        uint32 = 1
	repServer     uint32 = 2
	repInfo       uint32 = 3
	repErrUnsup   uint32 = 1<<31 + 1
	repErrPolicy  uint32 = 1<<31 + 2
	repErrInvalid uint32 = 1<<31 + 3
	repErrTLSReqd uint32 = 1<<31 + 5
	repErrUnknown uint32 = 1<<31 + 6
)

// Information types of NBD_REP_INFO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Commands and command flags.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdWriteZeroes uint16 = 6

	cmdFlagFUA    uint16 = 1 << 0
	cmdFlagNoHole uint16 = 1 << 1
)

// Error values of simple replies. They equal Linux errno numbers, but the
// protocol fixes them, so they are spelled out rather than taken from
// syscall (which differs on other systems).
const (
	errIO    uint32 = 5
	errInval uint32 = 22
)

// Message sizes.
const (
	requestSize  = 28  // magic, flags, type, handle, offset, length
	replySize    = 16  // magic, error, handle
	exportPadLen = 124 // zeroes after NBD_OPT_EXPORT_NAME's reply, unless NO_ZEROES
)

// maxOptionLen bounds the data of one option. Real options are an export
// name (at most 4096 bytes) plus a few words; anything far bigger is a
// client trying to make us allocate, so the connection is dropped.
const maxOptionLen = 64 << 10

// minBlockSize is the minimum block size advertised in
// NBD_INFO_BLOCK_SIZE: requests of any alignment are served.
const minBlockSize = 1

// maxNameLen is the protocol's limit for strings such as export names.
const maxNameLen = 4096
