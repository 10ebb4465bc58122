package chunk

import "context"

// A chunk's buffer is needed until its object is stored, not until it is
// applied to the map (docs/ARCHITECTURE.md §4.3, §4.4): the apply waits
// for every lower key, so one slow upload would otherwise hold every
// buffer behind it. A frontend that can serve reads of a stored chunk
// without its buffer passes a hook in the commit's context; the engine
// calls it once the object is stored and from then on no longer touches
// the buffer. The hook travels in the context so that engines that wrap
// a commit (tests, instrumentation) pass it on without knowing it.

type storedKey struct{}

// WithStoredHook returns ctx carrying fn: the engine calls fn(dataStart)
// once the chunk's object is stored, before it waits for the apply;
// dataStart is where the object's data area begins.
func WithStoredHook(ctx context.Context, fn func(dataStart int64)) context.Context {
	return context.WithValue(ctx, storedKey{}, fn)
}

// StoredHook returns the hook of ctx, or nil.
func StoredHook(ctx context.Context) func(dataStart int64) {
	fn, _ := ctx.Value(storedKey{}).(func(int64))
	return fn
}

type dataCRCKey struct{}

// WithDataCRC returns ctx carrying the CRC32C of the chunk's data area
// (Builder.DataCRC), which the engine combines into the upload's payload
// checksum instead of reading the whole object again.
func WithDataCRC(ctx context.Context, crc uint32) context.Context {
	return context.WithValue(ctx, dataCRCKey{}, crc)
}

// DataCRC returns the data area's CRC32C that ctx carries, if any.
func DataCRC(ctx context.Context) (uint32, bool) {
	crc, ok := ctx.Value(dataCRCKey{}).(uint32)
	return crc, ok
}
