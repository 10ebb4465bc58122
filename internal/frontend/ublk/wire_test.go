package ublk

import (
	"testing"
	"unsafe"
)

// The expected values are those of the kernel's include/uapi/linux/
// ublk_cmd.h and io_uring.h on x86-64 (natural C alignment), worked out
// from the headers' field lists.

func TestWireSizes(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"ublksrv_ctrl_cmd", unsafe.Sizeof(ctrlCmd{}), 32},
		{"ublksrv_ctrl_dev_info", unsafe.Sizeof(devInfo{}), 64},
		{"ublksrv_io_desc", unsafe.Sizeof(ioDesc{}), 24},
		{"ublksrv_io_cmd", unsafe.Sizeof(ioCmd{}), 16},
		{"ublk_param_basic", unsafe.Sizeof(paramBasic{}), 32},
		{"ublk_param_discard", unsafe.Sizeof(paramDiscard{}), 20},
		{"io_uring_params", unsafe.Sizeof(uringParams{}), 120},
		{"io_uring_sqe head", unsafe.Sizeof(sqe{}), 48},
		{"io_uring_cqe", unsafe.Sizeof(cqe{}), 16},
		{"ctrlCmdSize", ctrlCmdSize, 32},
		{"devInfoSize", devInfoSize, 64},
		{"ioDescSize", ioDescSize, 24},
		{"ioCmdSize", ioCmdSize, 16},
		{"paramsLen", paramsLen, 60},
	} {
		if c.got != c.want {
			t.Errorf("sizeof %s = %d, want %d", c.name, c.got, c.want)
		}
	}
}

func TestWireOffsets(t *testing.T) {
	var cc ctrlCmd
	var di devInfo
	var d ioDesc
	var ic ioCmd
	var b paramBasic
	var dc paramDiscard
	var p params
	var s sqe
	var up uringParams
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"ctrl_cmd.queue_id", unsafe.Offsetof(cc.QueueID), 4},
		{"ctrl_cmd.len", unsafe.Offsetof(cc.Len), 6},
		{"ctrl_cmd.addr", unsafe.Offsetof(cc.Addr), 8},
		{"ctrl_cmd.data", unsafe.Offsetof(cc.Data), 16},
		{"ctrl_cmd.dev_path_len", unsafe.Offsetof(cc.DevPathLen), 24},
		{"ctrl_cmd.reserved", unsafe.Offsetof(cc.Reserved), 28},
		{"dev_info.state", unsafe.Offsetof(di.State), 4},
		{"dev_info.max_io_buf_bytes", unsafe.Offsetof(di.MaxIOBufBytes), 8},
		{"dev_info.dev_id", unsafe.Offsetof(di.DevID), 12},
		{"dev_info.ublksrv_pid", unsafe.Offsetof(di.SrvPID), 16},
		{"dev_info.flags", unsafe.Offsetof(di.Flags), 24},
		{"dev_info.ublksrv_flags", unsafe.Offsetof(di.SrvFlags), 32},
		{"dev_info.owner_uid", unsafe.Offsetof(di.OwnerUID), 40},
		{"dev_info.reserved1", unsafe.Offsetof(di.Reserved1), 48},
		{"dev_info.reserved2", unsafe.Offsetof(di.Reserved2), 56},
		{"io_desc.nr_sectors", unsafe.Offsetof(d.NrSectors), 4},
		{"io_desc.start_sector", unsafe.Offsetof(d.StartSector), 8},
		{"io_desc.addr", unsafe.Offsetof(d.Addr), 16},
		{"io_cmd.tag", unsafe.Offsetof(ic.Tag), 2},
		{"io_cmd.result", unsafe.Offsetof(ic.Result), 4},
		{"io_cmd.addr", unsafe.Offsetof(ic.Addr), 8},
		{"param_basic.logical_bs_shift", unsafe.Offsetof(b.LogicalBSShift), 4},
		{"param_basic.physical_bs_shift", unsafe.Offsetof(b.PhysicalBSShift), 5},
		{"param_basic.io_opt_shift", unsafe.Offsetof(b.IOOptShift), 6},
		{"param_basic.io_min_shift", unsafe.Offsetof(b.IOMinShift), 7},
		{"param_basic.max_sectors", unsafe.Offsetof(b.MaxSectors), 8},
		{"param_basic.chunk_sectors", unsafe.Offsetof(b.ChunkSectors), 12},
		{"param_basic.dev_sectors", unsafe.Offsetof(b.DevSectors), 16},
		{"param_basic.virt_boundary_mask", unsafe.Offsetof(b.VirtBoundaryMask), 24},
		{"param_discard.discard_granularity", unsafe.Offsetof(dc.DiscardGranularity), 4},
		{"param_discard.max_discard_sectors", unsafe.Offsetof(dc.MaxDiscardSectors), 8},
		{"param_discard.max_write_zeroes_sectors", unsafe.Offsetof(dc.MaxWriteZeroesSectors), 12},
		{"param_discard.max_discard_segments", unsafe.Offsetof(dc.MaxDiscardSegments), 16},
		{"params.types", unsafe.Offsetof(p.Types), 4},
		{"params.basic", unsafe.Offsetof(p.Basic), 8},
		{"params.discard", unsafe.Offsetof(p.Discard), 40},
		{"sqe.fd", unsafe.Offsetof(s.Fd), 4},
		{"sqe.off (cmd_op)", unsafe.Offsetof(s.Off), 8},
		{"sqe.addr", unsafe.Offsetof(s.Addr), 16},
		{"sqe.len", unsafe.Offsetof(s.Len), 24},
		{"sqe.uring_cmd_flags", unsafe.Offsetof(s.OpFlags), 28},
		{"sqe.user_data", unsafe.Offsetof(s.UserData), 32},
		{"sqe.file_index", unsafe.Offsetof(s.FileIndex), 44},
		{"io_uring_params.features", unsafe.Offsetof(up.Features), 20},
		{"io_uring_params.sq_off", unsafe.Offsetof(up.SQOff), 40},
		{"io_uring_params.cq_off", unsafe.Offsetof(up.CQOff), 80},
	} {
		if c.got != c.want {
			t.Errorf("offsetof %s = %d, want %d", c.name, c.got, c.want)
		}
	}
}

// The ioctl-encoded command numbers, as _IOR/_IOWR('u', nr, struct) give
// them on x86-64.
func TestCommandEncoding(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint32
	}{
		{"UBLK_U_CMD_GET_DEV_INFO", uCmdGetDevInfo, 0x80207502},
		{"UBLK_U_CMD_ADD_DEV", uCmdAddDev, 0xc0207504},
		{"UBLK_U_CMD_DEL_DEV", uCmdDelDev, 0xc0207505},
		{"UBLK_U_CMD_START_DEV", uCmdStartDev, 0xc0207506},
		{"UBLK_U_CMD_STOP_DEV", uCmdStopDev, 0xc0207507},
		{"UBLK_U_CMD_SET_PARAMS", uCmdSetParams, 0xc0207508},
		{"UBLK_U_IO_FETCH_REQ", uIOFetchReq, 0xc0107520},
		{"UBLK_U_IO_COMMIT_AND_FETCH_REQ", uIOCommitAndFetchReq, 0xc0107521},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}
