package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/bond/convert"
)

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

// TestServerKernelMode runs `mptun server --kernel` on loopback (the
// kernel's MPTCP sockets, keys not visible: zero-key authenticators) and
// relays to a loopback destination (allowed with --allow-private).
func TestServerKernelMode(t *testing.T) {
	psk := make([]byte, 32)
	_, _ = rand.Read(psk)
	keyPath := filepath.Join(t.TempDir(), "key")
	require.NoError(t, os.WriteFile(keyPath, []byte(base64.StdEncoding.EncodeToString(psk)+"\n"), 0o600))

	dst, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { dst.Close() })
	go func() {
		for {
			c, err := dst.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c) // until the client's half-close
				_, _ = c.Write(append([]byte("got:"), b...))
			}()
		}
	}()

	listen, metrics := freePort(t), freePort(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var logs bytes.Buffer
	go func() {
		done <- cmdServer(ctx, []string{"--kernel", "--listen", listen, "--key-file", keyPath,
			"--allow-private", "--metrics", metrics, "--log-level", "error"}, &logs)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err, "clean shutdown")
		case <-time.After(10 * time.Second):
			t.Error("server did not stop")
		}
	})

	dial := func(key []byte) (net.Conn, error) {
		var d net.Dialer
		d.SetMultipathTCP(true)
		var c net.Conn
		require.Eventually(t, func() bool {
			var err error
			c, err = d.Dial("tcp", listen)
			return err == nil
		}, 5*time.Second, 20*time.Millisecond)
		t.Cleanup(func() { c.Close() })
		req := convert.Request{HasAuth: true, Auth: convert.AuthTag(key, 0, 0), Kind: convert.KindTCP,
			Dest: netip.MustParseAddrPort(dst.Addr().String())}
		require.NoError(t, convert.WriteRequest(c, req))
		require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
		return c, convert.ReadReply(c)
	}

	c, err := dial(psk)
	require.NoError(t, err)
	_, err = c.Write([]byte("hello"))
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Equal(t, "got:hello", string(got))

	_, err = dial([]byte("wrong key"))
	var ce *convert.ConvertError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, convert.ErrNotAuthorized, ce.Code)

	resp, err := http.Get("http://" + metrics + "/metrics")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Contains(t, string(body), "mptun_server_auth_failures_total 1\n")
	require.Contains(t, string(body), "mptun_server_tcp_flows_total 1\n")
}

func TestServerUsageErrors(t *testing.T) {
	tests := map[string][]string{
		"no listen":    {"--key-file", "/nonexistent"},
		"bad listen":   {"--listen", "nope", "--key-file", "/nonexistent"},
		"extra args":   {"--listen", "127.0.0.1:1", "x"},
		"no key file":  {"--listen", "127.0.0.1:1"},
		"missing conf": {"--config", "/nonexistent.toml"},
	}
	for name, args := range tests {
		t.Run(name, func(t *testing.T) {
			err := cmdServer(context.Background(), args, io.Discard)
			require.Error(t, err)
		})
	}
}

// TestServerDenyJoinInitialNeedsEngine: the flag configures the userspace
// engine; the kernel has its own sysctl, which the error names.
func TestServerDenyJoinInitialNeedsEngine(t *testing.T) {
	keyPath := filepath.Join(t.TempDir(), "key")
	require.NoError(t, os.WriteFile(keyPath, []byte(base64.StdEncoding.EncodeToString(make([]byte, 32))+"\n"), 0o600))
	var stderr bytes.Buffer
	code := run([]string{"server", "--kernel", "--deny-join-initial", "--listen", freePort(t), "--key-file", keyPath}, nil, io.Discard, &stderr)
	require.Equal(t, 2, code, "a usage error: %s", stderr.String())
	require.Contains(t, stderr.String(), "mptun server: --deny-join-initial is for the userspace engine")
	require.Contains(t, stderr.String(), "allow_join_initial_addr_port=0")
}
