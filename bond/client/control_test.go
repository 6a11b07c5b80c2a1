package client

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestControlSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("control socket answers root peers only; needs root (CI runs as root)")
	}
	path := filepath.Join(t.TempDir(), "sub", "x.sock")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	log := slog.New(slog.DiscardHandler)
	stop, err := ServeControl(ctx, path, func() any { return Status{Name: "x", PID: 42} }, log)
	require.NoError(t, err)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	di, err := os.Stat(filepath.Dir(path))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), di.Mode().Perm())

	qctx, qcancel := context.WithTimeout(ctx, 5*time.Second)
	defer qcancel()
	raw, err := QueryControl(qctx, path)
	require.NoError(t, err)
	var st Status
	require.NoError(t, json.Unmarshal(raw, &st))
	require.Equal(t, "x", st.Name)
	require.Equal(t, 42, st.PID)

	_, err = ServeControl(ctx, path, func() any { return nil }, log)
	require.ErrorContains(t, err, "in use")

	stop()
	_, err = os.Stat(path)
	require.True(t, os.IsNotExist(err), "socket file must be gone after stop: %v", err)
	_, err = QueryControl(qctx, path)
	require.ErrorContains(t, err, "no mptun client is running")
}
