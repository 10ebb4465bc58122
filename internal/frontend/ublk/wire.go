package ublk

// The ublk wire format: the structs and numbers of the kernel's
// include/uapi/linux/ublk_cmd.h that bs3 uses, laid out field for field
// (wire_test.go checks sizes and offsets against the header's values).

// Control commands, ioctl-encoded (UBLK_F_CMD_IOCTL_ENCODE): the legacy
// bare numbers need CONFIG_BLKDEV_UBLK_LEGACY_OPCODES, the encoded ones
// work on every kernel since 6.3.
const (
	cmdGetDevInfo = 0x02
	cmdAddDev     = 0x04
	cmdDelDev     = 0x05
	cmdStartDev   = 0x06
	cmdStopDev    = 0x07
	cmdSetParams  = 0x08

	ioFetchReq          = 0x20
	ioCommitAndFetchReq = 0x21
)

// ioctl direction bits and the 'u' type of every ublk command.
const (
	iocWrite = 1
	iocRead  = 2
	ublkType = 'u'
)

// ioc builds an ioctl number as the kernel's _IOC macro does.
func ioc(dir, nr, size uint32) uint32 {
	return dir<<30 | size<<16 | ublkType<<8 | nr
}

var (
	uCmdGetDevInfo = ioc(iocRead, cmdGetDevInfo, ctrlCmdSize)
	uCmdAddDev     = ioc(iocRead|iocWrite, cmdAddDev, ctrlCmdSize)
	uCmdDelDev     = ioc(iocRead|iocWrite, cmdDelDev, ctrlCmdSize)
	uCmdStartDev   = ioc(iocRead|iocWrite, cmdStartDev, ctrlCmdSize)
	uCmdStopDev    = ioc(iocRead|iocWrite, cmdStopDev, ctrlCmdSize)
	uCmdSetParams  = ioc(iocRead|iocWrite, cmdSetParams, ctrlCmdSize)

	uIOFetchReq          = ioc(iocRead|iocWrite, ioFetchReq, ioCmdSize)
	uIOCommitAndFetchReq = ioc(iocRead|iocWrite, ioCommitAndFetchReq, ioCmdSize)
)

// Results of an I/O command's completion.
const (
	ioResOK    = 0
	ioResAbort = -19 // -ENODEV: the device is going away, no re-fetch
)

// maxQueueDepth is UBLK_MAX_QUEUE_DEPTH; the descriptor area of queue q
// starts at q * round_up(maxQueueDepth * ioDescSize, page) in /dev/ublkcN.
const maxQueueDepth = 4096

// Device feature flags (ublksrv_ctrl_dev_info.flags).
const (
	flagUserRecovery   = 1 << 3
	flagCmdIoctlEncode = 1 << 6
)

// I/O operations and flags (ublksrv_io_desc.op_flags: op in bits 0-7).
const (
	opRead        = 0
	opWrite       = 1
	opFlush       = 2
	opDiscard     = 3
	opWriteSame   = 4
	opWriteZeroes = 5

	ioFlagFUA = 1 << 13
)

// Parameter types and basic attributes (ublk_params).
const (
	paramTypeBasic   = 1 << 0
	paramTypeDiscard = 1 << 1

	attrVolatileCache = 1 << 2
	attrFUA           = 1 << 3
)

// ctrlCmd is struct ublksrv_ctrl_cmd, carried in the SQE's command area.
type ctrlCmd struct {
	DevID      uint32
	QueueID    uint16
	Len        uint16
	Addr       uint64
	Data       uint64
	DevPathLen uint16
	Pad        uint16
	Reserved   uint32
}

const ctrlCmdSize = 32

// devInfo is struct ublksrv_ctrl_dev_info.
type devInfo struct {
	NrHWQueues    uint16
	QueueDepth    uint16
	State         uint16
	Pad0          uint16
	MaxIOBufBytes uint32
	DevID         uint32
	SrvPID        int32
	Pad1          uint32
	Flags         uint64
	SrvFlags      uint64
	OwnerUID      uint32
	OwnerGID      uint32
	Reserved1     uint64
	Reserved2     uint64
}

const devInfoSize = 64

// ioDesc is struct ublksrv_io_desc, written by the kernel into the
// queue's shared descriptor area, one per tag.
type ioDesc struct {
	OpFlags     uint32
	NrSectors   uint32
	StartSector uint64
	Addr        uint64
}

const ioDescSize = 24

// ioCmd is struct ublksrv_io_cmd, carried in the SQE's command area.
type ioCmd struct {
	QID    uint16
	Tag    uint16
	Result int32
	Addr   uint64
}

const ioCmdSize = 16

// paramBasic is struct ublk_param_basic.
type paramBasic struct {
	Attrs            uint32
	LogicalBSShift   uint8
	PhysicalBSShift  uint8
	IOOptShift       uint8
	IOMinShift       uint8
	MaxSectors       uint32
	ChunkSectors     uint32
	DevSectors       uint64
	VirtBoundaryMask uint64
}

// paramDiscard is struct ublk_param_discard.
type paramDiscard struct {
	DiscardAlignment      uint32
	DiscardGranularity    uint32
	MaxDiscardSectors     uint32
	MaxWriteZeroesSectors uint32
	MaxDiscardSegments    uint16
	Reserved0             uint16
}

// params is the head of struct ublk_params up to the discard limits: the
// kernel copies Len bytes, and bs3 sets no later parameter type.
type params struct {
	Len     uint32
	Types   uint32
	Basic   paramBasic
	Discard paramDiscard
}

// paramsLen is the bytes of ublk_params that bs3 sends: the header, basic
// and discard, without the Go struct's tail padding.
const paramsLen = 8 + 32 + 20
