package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestErrorPrefix: every command reports an error once, as "mptun CMD: ...",
// with the exit status for its kind; nothing here needs root (the engine
// refuses a missing --uplink before touching the host).
func TestErrorPrefix(t *testing.T) {
	tests := []struct {
		args []string
		code int
		want string // the error line
		// flags: the command's flags follow the error.
		flags bool
	}{
		{[]string{"connect"}, 2, "mptun connect: want exactly one HOST:PORT, got 0 arguments", false},
		{[]string{"connect", "--bogus", "1.2.3.4:1"}, 2, "mptun connect: flag provided but not defined: -bogus", true},
		{[]string{"connect", "1.2.3.4:1"}, 2, "mptun connect: at least one --uplink is required", false},
		{[]string{"connect", "--log-level", "loud", "1.2.3.4:1"}, 2, `mptun connect: --log-level "loud": `, false},
		{[]string{"listen", ":0"}, 2, `mptun listen: port ":0": want :1-65535`, false},
		{[]string{"listen", "--uplink", "a,b=c", ":1"}, 2, `mptun listen: invalid value "a,b=c" for flag -uplink: `, true},
		{[]string{"client", "--key-file", "/nonexistent"}, 2, "mptun client: --server ADDR:PORT is required", false},
		{[]string{"client", "x"}, 2, `mptun client: unexpected arguments ["x"]`, false},
		{[]string{"server", "--listen", "nope"}, 2, `mptun server: --listen "nope": want ADDR:PORT`, false},
		{[]string{"server", "--listen", "127.0.0.1:1", "--key-file", "/nonexistent"}, 1, "mptun server: key file: ", false},
		{[]string{"genkey", "x"}, 2, `mptun genkey: unexpected arguments ["x"]`, false},
		{[]string{"status", "--json", "x"}, 2, `mptun status: unexpected arguments ["x"]`, false},
		{[]string{"status", "--bogus"}, 2, "mptun status: flag provided but not defined: -bogus", true},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tc.args, strings.NewReader(""), &stdout, &stderr)
			require.Equal(t, tc.code, code, "stderr:\n%s", stderr.String())
			lines := strings.Split(strings.TrimRight(stderr.String(), "\n"), "\n")
			require.True(t, strings.HasPrefix(lines[0], tc.want), "first line %q, want %q", lines[0], tc.want)
			require.Equal(t, 1, strings.Count(stderr.String(), strings.TrimSuffix(tc.want, ": ")), "reported once:\n%s", stderr.String())
			if tc.flags {
				require.Equal(t, "flags of mptun "+tc.args[0]+":", lines[1])
			} else {
				require.Len(t, lines, 1, "just the error:\n%s", stderr.String())
			}
			require.Empty(t, stdout.String())
		})
	}
}

// TestHelpFlag: -h lists a command's flags and is not an error.
func TestHelpFlag(t *testing.T) {
	for _, cmd := range []string{"connect", "listen", "client", "server", "status"} {
		var stdout, stderr bytes.Buffer
		require.Equal(t, 0, run([]string{cmd, "-h"}, strings.NewReader(""), &stdout, &stderr), cmd)
		require.True(t, strings.HasPrefix(stderr.String(), "flags of mptun "+cmd+":\n"), "%s:\n%s", cmd, stderr.String())
		require.NotContains(t, stderr.String(), "help requested")
	}
	var stdout bytes.Buffer
	require.Equal(t, 0, run([]string{"client", "-h"}, strings.NewReader(""), &stdout, &stdout))
	require.Contains(t, stdout.String(), "-config FILE", "client takes a config file")
}
