package main

import (
	"bytes"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestGenkeyRoundTrip(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, cmdGenkey(nil, &out))
	require.True(t, strings.HasSuffix(out.String(), "\n"))
	require.Equal(t, 1, strings.Count(out.String(), "\n"))
	path := filepath.Join(t.TempDir(), "key")
	require.NoError(t, os.WriteFile(path, out.Bytes(), 0o600))
	k, err := readKeyFile(path)
	require.NoError(t, err)
	require.Len(t, k, keyLen)
	var again bytes.Buffer
	require.NoError(t, cmdGenkey(nil, &again))
	require.NotEqual(t, out.String(), again.String())
	require.Error(t, cmdGenkey([]string{"x"}, &again))
}

func TestParseKey(t *testing.T) {
	tests := []struct {
		name, text string
		ok         bool
	}{
		{"32 bytes", base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\n", true},
		{"31 bytes", base64.StdEncoding.EncodeToString(make([]byte, 31)), false},
		{"33 bytes", base64.StdEncoding.EncodeToString(make([]byte, 33)), false},
		{"not base64", "hello world!", false},
		{"empty", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseKey(tt.text)
			if tt.ok {
				require.NoError(t, err)
			} else {
				require.Error(t, err)
				require.Contains(t, err.Error(), "mptun genkey")
			}
		})
	}
	_, err := readKeyFile(filepath.Join(t.TempDir(), "missing"))
	require.Error(t, err)
}
