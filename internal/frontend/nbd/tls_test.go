package nbd

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// testPKI is a CA with a server certificate for 127.0.0.1/localhost and a
// client certificate, written as PEM files in the layout libnbd's
// tls-certificates directory and qemu's tls-creds-x509 expect
// (ca-cert.pem, client-cert.pem, client-key.pem; server-*.pem).
type testPKI struct {
	dir        string
	pool       *x509.CertPool
	clientCert tls.Certificate
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	dir := t.TempDir()
	caKey := newKey(t)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bs3 test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, "ca-cert.pem"), "CERTIFICATE", caDER)
	issue := func(name string, serial int64, usage x509.ExtKeyUsage, server bool) {
		key := newKey(t)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment, ExtKeyUsage: []x509.ExtKeyUsage{usage},
		}
		if server {
			tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
			tmpl.DNSNames = []string{"localhost"}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(t, filepath.Join(dir, name+"-cert.pem"), "CERTIFICATE", der)
		writePEM(t, filepath.Join(dir, name+"-key.pem"), "PRIVATE KEY", kder)
	}
	issue("server", 2, x509.ExtKeyUsageServerAuth, true)
	issue("client", 3, x509.ExtKeyUsageClientAuth, false)
	p := &testPKI{dir: dir, pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	if p.clientCert, err = tls.LoadX509KeyPair(p.path("client-cert.pem"), p.path("client-key.pem")); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *testPKI) path(name string) string { return filepath.Join(p.dir, name) }

func (p *testPKI) serverTLS(t *testing.T, requireClientCert bool) *tls.Config {
	t.Helper()
	ca := ""
	if requireClientCert {
		ca = p.path("ca-cert.pem")
	}
	cfg, err := LoadTLS(p.path("server-cert.pem"), p.path("server-key.pem"), ca)
	if err != nil {
		t.Fatalf("LoadTLS: %v", err)
	}
	return cfg
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// startTLS sends NBD_OPT_STARTTLS and returns its reply type; on ACK the
// client runs the TLS handshake with cfg and continues inside it.
func (c *rawClient) startTLS(cfg *tls.Config) (uint32, error) {
	c.t.Helper()
	c.sendOpt(optStartTLS, nil)
	r := c.readOptReply()
	if r.typ != repAck {
		return r.typ, nil
	}
	tc := tls.Client(c.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return r.typ, err
	}
	c.nc, c.r = tc, bufio.NewReader(tc)
	return r.typ, nil
}

func (p *testPKI) clientTLS(withCert bool) *tls.Config {
	cfg := &tls.Config{RootCAs: p.pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	if withCert {
		cfg.Certificates = []tls.Certificate{p.clientCert}
	}
	return cfg
}

// TestTLSOptional: with TLS offered, a client that upgrades reads and
// writes inside TLS, and a client that does not is still served.
func TestTLSOptional(t *testing.T) {
	pki := newTestPKI(t)
	srv := startServer(t, newTestDevice(t, 16<<20, 4096), Options{TLS: pki.serverTLS(t, false)})

	c := dialRaw(t, srv.Addr())
	c.greet(3)
	if typ, err := c.startTLS(pki.clientTLS(false)); typ != repAck || err != nil {
		t.Fatalf("STARTTLS: reply %#x, handshake %v; want ACK and a handshake", typ, err)
	}
	if _, ok := c.nc.(*tls.Conn); !ok {
		t.Fatal("the client is not inside TLS after STARTTLS")
	}
	c.goExport("bs3")
	c.mustRoundTrip(4096, 64<<10, 7)
	c.disconnect()

	plain := connect(t, srv.Addr(), "bs3")
	plain.mustRoundTrip(8192, 4096, 9)
	plain.disconnect()
}

// TestTLSRequired: a plain client gets NBD_REP_ERR_TLS_REQD for every
// option and is disconnected when it chooses the export by name; after
// STARTTLS it is served; a second STARTTLS is refused.
func TestTLSRequired(t *testing.T) {
	pki := newTestPKI(t)
	srv := startServer(t, newTestDevice(t, 16<<20, 4096), Options{TLS: pki.serverTLS(t, false), TLSRequired: true})

	c := dialRaw(t, srv.Addr())
	c.greet(3)
	for _, o := range []struct {
		opt  uint32
		data []byte
	}{{optList, nil}, {optInfo, infoData("bs3")}, {optGo, infoData("bs3")}, {99, nil}} {
		c.sendOpt(o.opt, o.data)
		if r := c.readOptReply(); r.typ != repErrTLSReqd {
			t.Fatalf("option %d without TLS: reply %#x, want NBD_REP_ERR_TLS_REQD", o.opt, r.typ)
		}
	}
	c.sendOpt(optExportName, []byte("bs3"))
	c.expectClosed()

	c = dialRaw(t, srv.Addr())
	c.greet(3)
	if typ, err := c.startTLS(pki.clientTLS(false)); typ != repAck || err != nil {
		t.Fatalf("STARTTLS: reply %#x, handshake %v", typ, err)
	}
	if typ, _ := c.startTLS(pki.clientTLS(false)); typ != repErrInvalid {
		t.Fatalf("second STARTTLS: reply %#x, want NBD_REP_ERR_INVALID", typ)
	}
	c.goExport("bs3")
	c.mustRoundTrip(0, 4096, 3)
	c.disconnect()
}

// TestTLSNotConfigured: STARTTLS on a server without TLS is answered with
// NBD_REP_ERR_UNSUP and the client goes on in clear text.
func TestTLSNotConfigured(t *testing.T) {
	srv := startServer(t, newTestDevice(t, 16<<20, 4096), Options{})
	c := dialRaw(t, srv.Addr())
	c.greet(3)
	if typ, _ := c.startTLS(&tls.Config{}); typ != repErrUnsup {
		t.Fatalf("STARTTLS without TLS configured: reply %#x, want NBD_REP_ERR_UNSUP", typ)
	}
	c.goExport("bs3")
	c.mustRoundTrip(0, 4096, 5)
	c.disconnect()
	if _, err := New(newTestDevice(t, 16<<20, 4096), Options{Listen: "127.0.0.1:0", TLSRequired: true}); err == nil || !strings.Contains(err.Error(), "tls_cert") {
		t.Fatalf("TLSRequired without TLS: %v, want an error naming tls_cert", err)
	}
}

// TestTLSClientCertificate: with a client CA configured, a client without
// a certificate fails the handshake and one with a certificate signed by
// the CA is served.
func TestTLSClientCertificate(t *testing.T) {
	pki := newTestPKI(t)
	srv := startServer(t, newTestDevice(t, 16<<20, 4096), Options{TLS: pki.serverTLS(t, true), TLSRequired: true})

	c := dialRaw(t, srv.Addr())
	c.greet(3)
	typ, err := c.startTLS(pki.clientTLS(false))
	if err == nil {
		// TLS 1.3 reports the missing certificate on the first read.
		_, err = c.nc.Read(make([]byte, 1))
	}
	if typ != repAck || err == nil {
		t.Fatalf("client without a certificate: reply %#x, error %v; want the TLS handshake to fail", typ, err)
	}

	c = dialRaw(t, srv.Addr())
	c.greet(3)
	if typ, err := c.startTLS(pki.clientTLS(true)); typ != repAck || err != nil {
		t.Fatalf("client with a certificate: reply %#x, handshake %v", typ, err)
	}
	c.goExport("bs3")
	c.mustRoundTrip(0, 4096, 11)
	c.disconnect()
}

// TestTLSRealClients: libnbd (nbdinfo, nbdcopy) and qemu-io connect with
// nbds:// and TLS credentials; a plain libnbd client is refused by a
// server that requires TLS.
func TestTLSRealClients(t *testing.T) {
	const size = 64 << 20
	pki := newTestPKI(t)
	srv := startServer(t, newTestDevice(t, size, 4096), Options{TLS: pki.serverTLS(t, true), TLSRequired: true})
	uri := strings.Replace(srv.URI(), "nbd://", "nbds://", 1) + "?tls-certificates=" + pki.dir

	t.Run("nbdinfo", func(t *testing.T) {
		needTool(t, "nbdinfo", "libnbd-bin")
		out, err := runTool(t, "nbdinfo", "--size", uri)
		if err != nil || strings.TrimSpace(out) != "67108864" {
			t.Fatalf("nbdinfo --size over TLS: %v, output %q; want %d", err, out, size)
		}
		out, err = runTool(t, "nbdinfo", "--size", srv.URI())
		if err == nil {
			t.Fatalf("a plain nbdinfo was served by a server that requires TLS: %q", out)
		}
	})
	t.Run("nbdcopy", func(t *testing.T) { runNbdcopy(t, uri, 16<<20) })
	t.Run("qemu-io", func(t *testing.T) {
		needTool(t, "qemu-io", "qemu-utils")
		_, port, _ := net.SplitHostPort(srv.Addr())
		out, err := runTool(t, "qemu-io",
			"--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+pki.dir,
			"--image-opts", "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port="+port+",export=bs3,tls-creds=tls0",
			"-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k")
		if err != nil || qemuIOFailed(out) {
			t.Fatalf("qemu-io over TLS: %v\n%s", err, out)
		}
	})
}

// TestUnixSocketMode: a unix socket is created with mode 0600, or 0660
// and the configured group, and removed on Close.
func TestUnixSocketMode(t *testing.T) {
	g, err := user.LookupGroupId(strconv.Itoa(os.Getgid()))
	if err != nil {
		t.Fatalf("look up my group: %v", err)
	}
	for _, tc := range []struct {
		group string
		mode  os.FileMode
	}{{"", 0o600}, {g.Name, 0o660}} {
		path := filepath.Join(t.TempDir(), "nbd.sock")
		s, err := New(newTestDevice(t, 16<<20, 4096), Options{Listen: "unix:" + path, SocketGroup: tc.group, Logger: testLogger(t)})
		if err != nil {
			t.Fatalf("New with group %q: %v", tc.group, err)
		}
		go s.Serve()
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatalf("stat the socket: %v", err)
		}
		if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != tc.mode {
			t.Fatalf("group %q: socket mode %v, want a socket with %v", tc.group, fi.Mode(), tc.mode)
		}
		if st := fi.Sys().(*syscall.Stat_t); tc.group != "" && int(st.Gid) != os.Getgid() {
			t.Fatalf("socket group %d, want %d", st.Gid, os.Getgid())
		}
		if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
			t.Fatalf("the socket's directory holds %d entries, want only the socket (the private bind directory is gone)", len(entries))
		}
		c := connect(t, s.Addr(), "bs3")
		c.mustRoundTrip(0, 4096, 1)
		c.disconnect()
		if err := s.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if _, err := os.Lstat(path); !os.IsNotExist(err) {
			t.Fatalf("socket still there after Close: %v", err)
		}
	}
	if _, err := New(newTestDevice(t, 16<<20, 4096), Options{Listen: "unix:" + filepath.Join(t.TempDir(), "s"), SocketGroup: "no-such-group-bs3"}); err == nil {
		t.Fatal("an unknown socket group was accepted")
	}
}
