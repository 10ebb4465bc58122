package nbd

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLS (NBD_OPT_STARTTLS). The client asks for TLS during option haggling;
// the server acknowledges, both run a TLS handshake over the same socket,
// and haggling starts over inside TLS (docs/ARCHITECTURE.md §17). With
// Options.TLSRequired every option but STARTTLS and ABORT is refused with
// NBD_REP_ERR_TLS_REQD until then, so no data and not even the export's
// size leaves the server in clear text.

// errNotUpgraded: a STARTTLS request was answered with an error reply and
// the connection goes on in clear text.
var errNotUpgraded = errors.New("STARTTLS refused")

// optStartTLS answers NBD_OPT_STARTTLS and, when it is accepted, upgrades
// the connection.
func (c *conn) optStartTLS(data []byte, secured bool) error {
	switch {
	case c.s.tls == nil:
		if err := c.optReply(optStartTLS, repErrUnsup, []byte("TLS is not configured on this server (nbd.tls)")); err != nil {
			return err
		}
		return errNotUpgraded
	case secured:
		if err := c.optReply(optStartTLS, repErrInvalid, []byte("TLS is already in use")); err != nil {
			return err
		}
		return errNotUpgraded
	case len(data) != 0:
		if err := c.optReply(optStartTLS, repErrInvalid, []byte("NBD_OPT_STARTTLS takes no data")); err != nil {
			return err
		}
		return errNotUpgraded
	}
	if err := c.optReply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	// The client must wait for the acknowledgement before its TLS
	// handshake: bytes already buffered would be clear text smuggled past
	// the upgrade.
	if c.r.Buffered() != 0 {
		return fmt.Errorf("client sent %d bytes after NBD_OPT_STARTTLS before its acknowledgement", c.r.Buffered())
	}
	tc := tls.Server(c.nc, c.s.tls)
	// The handshake deadline set at accept still bounds this.
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.nc = tc
	c.r = bufio.NewReaderSize(tc, 64<<10)
	st := tc.ConnectionState()
	ev := c.log.Debug().Str("tls_version", tls.VersionName(st.Version)).Str("cipher", tls.CipherSuiteName(st.CipherSuite))
	if len(st.PeerCertificates) > 0 {
		ev = ev.Str("client_cert", st.PeerCertificates[0].Subject.String())
	}
	ev.Msg("TLS established")
	return nil
}

// LoadTLS builds the server's TLS configuration from PEM files: the
// certificate chain and its key, and, when caFile is not empty, the CA
// that client certificates must chain to (clients without one are
// refused in the TLS handshake).
func LoadTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	if certFile == "" || keyFile == "" {
		return nil, errors.New("nbd TLS needs both a certificate (nbd.tls_cert) and its key (nbd.tls_key)")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load the NBD TLS certificate %s and key %s: %w", certFile, keyFile, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("read the NBD client CA %s: %w", caFile, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("the NBD client CA %s holds no PEM certificate", caFile)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}
