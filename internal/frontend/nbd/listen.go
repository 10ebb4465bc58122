package nbd

import "net"

// Listen binds addr ("host:port" or "unix:/path", a unix socket open to
// group as with Options.SocketGroup) as New would, for a
// caller that must know the address is free before it does anything
// else: bs3 binds its export before it attaches the volume, so that an
// address in use fails the start with nothing claimed in the bucket.
// Pass the listener to New in Options.Listener. A client that connects
// before the server runs waits in the listen backlog for the handshake.
func Listen(addr, group string) (net.Listener, error) {
	ln, _, err := listen(addr, group)
	return ln, err
}
