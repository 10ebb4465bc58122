package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// errAbort ends a negotiation the client gave up (NBD_OPT_ABORT); it is
// not a failure.
var errAbort = errors.New("client aborted negotiation")

// transmissionFlags are the export's flags. CAN_MULTI_CONN holds because
// Device.Flush covers every write acknowledged on any connection.
const transmissionFlags = tflagHasFlags | tflagSendFlush | tflagSendFUA |
	tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn

// negotiate runs the fixed newstyle handshake. It returns nil when the
// client has chosen the export and the transmission phase begins, errAbort
// on NBD_OPT_ABORT, and another error for a protocol violation or I/O
// failure (the caller closes the connection either way).
func (c *conn) negotiate() error {
	fixed, noZeroes, err := c.greet()
	if err != nil {
		return err
	}
	secured := false // NBD_OPT_STARTTLS done
	for {
		opt, data, err := c.readOption()
		if err != nil {
			return err
		}
		if !fixed && opt != optExportName {
			// A client without fixed newstyle cannot parse option
			// replies; closing is the only answer it understands.
			return fmt.Errorf("option %d from a client without fixed newstyle", opt)
		}
		c.log.Debug().Uint32("option", opt).Int("len", len(data)).Msg("option")

		if c.s.tlsRequired && !secured && opt != optStartTLS && opt != optAbort {
			if opt == optExportName {
				// It cannot carry an error reply: closing is the answer.
				return errors.New("client chose the export without TLS, which this server requires (nbd.tls = \"require\")")
			}
			if err := c.optReply(opt, repErrTLSReqd, []byte("this server requires TLS: use NBD_OPT_STARTTLS (an nbds:// URI)")); err != nil {
				return err
			}
			continue
		}
		switch opt {
		case optStartTLS:
			if err := c.optStartTLS(data, secured); err != nil {
				if errors.Is(err, errNotUpgraded) {
					continue
				}
				return err
			}
			secured = true
			continue
		}
		switch opt {
		case optExportName:
			return c.optExportName(string(data), noZeroes)
		case optAbort:
			// Best effort: the client may already have hung up.
			if err := c.optReply(opt, repAck, nil); err != nil {
				c.log.Debug().Err(err).Msg("ack abort")
			}
			return errAbort
		case optList:
			if err := c.optList(data); err != nil {
				return err
			}
		case optInfo, optGo:
			done, err := c.optInfoGo(opt, data)
			if err != nil || done {
				return err
			}
		default:
			// Includes STRUCTURED_REPLY, which we do not serve: simple
			// replies are always allowed.
			if err := c.optReply(opt, repErrUnsup, []byte("option not supported")); err != nil {
				return err
			}
		}
	}
}

// greet sends the server greeting and reads the client flags.
func (c *conn) greet() (fixed, noZeroes bool, err error) {
	var greet [18]byte
	binary.BigEndian.PutUint64(greet[0:], magicInit)
	binary.BigEndian.PutUint64(greet[8:], magicOpt)
	binary.BigEndian.PutUint16(greet[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(greet[:]); err != nil {
		return false, false, fmt.Errorf("send greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.r, cf[:]); err != nil {
		return false, false, fmt.Errorf("read client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^clientKnownFlags != 0 {
		// The protocol requires dropping clients that set unknown flags.
		return false, false, fmt.Errorf("unknown client flags %#x", clientFlags)
	}
	return clientFlags&clientFixedNewstyle != 0, clientFlags&clientNoZeroes != 0, nil
}

// readOption reads one option request.
func (c *conn) readOption() (opt uint32, data []byte, err error) {
	var hdr [16]byte
	if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
		return 0, nil, fmt.Errorf("read option header: %w", err)
	}
	if m := binary.BigEndian.Uint64(hdr[0:]); m != magicOpt {
		return 0, nil, fmt.Errorf("bad option magic %#x", m)
	}
	opt = binary.BigEndian.Uint32(hdr[8:])
	n := binary.BigEndian.Uint32(hdr[12:])
	if n > maxOptionLen {
		return 0, nil, fmt.Errorf("option %d carries %d bytes, more than %d", opt, n, maxOptionLen)
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(c.r, data); err != nil {
		return 0, nil, fmt.Errorf("read option %d data: %w", opt, err)
	}
	return opt, data, nil
}

// exportKnown reports whether name selects our export ("" is the default).
func (c *conn) exportKnown(name string) bool {
	return name == "" || name == c.s.export
}

// optExportName answers NBD_OPT_EXPORT_NAME, which cannot carry an error:
// an unknown export ends the session.
func (c *conn) optExportName(name string, noZeroes bool) error {
	if !c.exportKnown(name) {
		return fmt.Errorf("unknown export %q requested with NBD_OPT_EXPORT_NAME", name)
	}
	buf := make([]byte, 10, 10+exportPadLen)
	binary.BigEndian.PutUint64(buf[0:], uint64(c.s.size))
	binary.BigEndian.PutUint16(buf[8:], transmissionFlags)
	if !noZeroes {
		buf = buf[:10+exportPadLen] // zeroed by make
	}
	if _, err := c.nc.Write(buf); err != nil {
		return fmt.Errorf("send export info: %w", err)
	}
	return nil
}

func (c *conn) optList(data []byte) error {
	if len(data) != 0 {
		return c.optReply(optList, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
	}
	entry := make([]byte, 4+len(c.s.export))
	binary.BigEndian.PutUint32(entry, uint32(len(c.s.export)))
	copy(entry[4:], c.s.export)
	if err := c.optReply(optList, repServer, entry); err != nil {
		return err
	}
	return c.optReply(optList, repAck, nil)
}

// optInfoGo answers NBD_OPT_INFO and NBD_OPT_GO; done is true when the
// transmission phase begins.
func (c *conn) optInfoGo(opt uint32, data []byte) (done bool, err error) {
	// Layout: name length (4), name, count of info requests (2), requests (2 each).
	if len(data) < 6 {
		return false, c.optReply(opt, repErrInvalid, []byte("option data too short"))
	}
	nameLen := binary.BigEndian.Uint32(data)
	if uint64(nameLen) > uint64(len(data)-6) {
		return false, c.optReply(opt, repErrInvalid, []byte("export name length exceeds option data"))
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return false, c.optReply(opt, repErrInvalid, []byte("information request count does not match option length"))
	}
	var wantName, wantDesc bool
	for i := 0; i < nreq; i++ {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	if !c.exportKnown(name) {
		c.log.Debug().Str("export", name).Msg("unknown export requested")
		return false, c.optReply(opt, repErrUnknown, []byte("unknown export"))
	}

	exp := make([]byte, 12)
	binary.BigEndian.PutUint16(exp[0:], infoExport)
	binary.BigEndian.PutUint64(exp[2:], uint64(c.s.size))
	binary.BigEndian.PutUint16(exp[10:], transmissionFlags)
	if err := c.optReply(opt, repInfo, exp); err != nil {
		return false, err
	}
	// Block sizes are sent whether asked or not. The minimum is 1: every
	// byte range inside the export is served (partial blocks by
	// read-modify-write), which is also what the protocol lets a client
	// assume when nothing is negotiated, so clients that ignore this
	// (NBD_OPT_EXPORT_NAME, older tools) and clients that honour it see
	// the same server. The preferred size, the device block size, tells
	// them what avoids read-modify-write.
	bsz := make([]byte, 14)
	binary.BigEndian.PutUint16(bsz[0:], infoBlockSize)
	binary.BigEndian.PutUint32(bsz[2:], minBlockSize)
	binary.BigEndian.PutUint32(bsz[6:], uint32(c.s.blockSize))
	binary.BigEndian.PutUint32(bsz[10:], uint32(c.s.maxReq))
	if err := c.optReply(opt, repInfo, bsz); err != nil {
		return false, err
	}
	if wantName {
		b := make([]byte, 2+len(c.s.export))
		binary.BigEndian.PutUint16(b, infoName)
		copy(b[2:], c.s.export)
		if err := c.optReply(opt, repInfo, b); err != nil {
			return false, err
		}
	}
	if wantDesc {
		const desc = "bs3 block device on object storage"
		b := make([]byte, 2+len(desc))
		binary.BigEndian.PutUint16(b, infoDescription)
		copy(b[2:], desc)
		if err := c.optReply(opt, repInfo, b); err != nil {
			return false, err
		}
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return false, err
	}
	return opt == optGo, nil
}

// optReply sends one option reply.
func (c *conn) optReply(opt, typ uint32, data []byte) error {
	buf := make([]byte, 20+len(data))
	binary.BigEndian.PutUint64(buf[0:], magicOptReply)
	binary.BigEndian.PutUint32(buf[8:], opt)
	binary.BigEndian.PutUint32(buf[12:], typ)
	binary.BigEndian.PutUint32(buf[16:], uint32(len(data)))
	copy(buf[20:], data)
	if _, err := c.nc.Write(buf); err != nil {
		return fmt.Errorf("send reply to option %d: %w", opt, err)
	}
	return nil
}
