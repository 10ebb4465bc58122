package chunker

// Buffers reports how many chunk buffers hold data that is not committed
// yet (the open chunk, chunks being committed, chunks whose commit
// failed) and how many there are; writers wait when all are in use.
func (c *Chunker) Buffers() (inUse, total int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.o.Buffers - len(c.free), c.o.Buffers
}

// AdoptedWindows is how many payload windows (WriteWindows) chunks took
// as they are, without copying them.
func (c *Chunker) AdoptedWindows() int64 { return c.adopted.Load() }
