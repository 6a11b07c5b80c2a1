package kernelvectors

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestCommittedFileRoundTrips: the committed file has exactly this layout
// (no field lost or unknown) and Save writes it byte for byte as it is.
func TestCommittedFileRoundTrips(t *testing.T) {
	committed := filepath.Join("..", "..", "mptcpep", "mpkey", "testdata", "kernel-vectors.json")
	v, err := Load(committed)
	require.NoError(t, err)
	require.NotZero(t, v.ClientKey)
	require.NotZero(t, v.ServerKey)
	require.NotEmpty(t, v.Join.ACKHMAC)
	require.NotEmpty(t, v.DSSChecksum.Payload)
	require.NotZero(t, v.MPCapableChecksum.ClientKey)

	out := filepath.Join(t.TempDir(), "v.json")
	require.NoError(t, Save(out, v))
	want, err := os.ReadFile(committed)
	require.NoError(t, err)
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	require.Equal(t, string(want), string(got))
}

func TestLoadErrors(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "missing.json"))
	require.Error(t, err)
	bad := filepath.Join(t.TempDir(), "bad.json")
	require.NoError(t, os.WriteFile(bad, []byte("{"), 0o644))
	_, err = Load(bad)
	require.ErrorContains(t, err, "bad.json")
}
