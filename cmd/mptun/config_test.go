package main

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestLoadConfigExamples(t *testing.T) {
	for _, name := range []string{"server.toml", "client.toml"} {
		c, err := loadConfig(filepath.Join("..", "..", "examples", name))
		require.NoError(t, err, name)
		if name == "server.toml" {
			require.Equal(t, "0.0.0.0:4443", c.Server.Listen)
			require.Equal(t, 2*time.Hour, c.Server.TCPIdle.Duration)
		} else {
			require.NotEmpty(t, c.Client.Uplinks)
		}
	}
}

func TestLoadConfigErrors(t *testing.T) {
	dir := t.TempDir()
	tests := map[string]string{
		"unknown key":  "[server]\nlisten = \"1.2.3.4:1\"\nlistne = 1\n",
		"bad duration": "[server]\ntcp_idle = \"2 hours\"\n",
		"bad syntax":   "[server\n",
	}
	for name, text := range tests {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(dir, "c.toml")
			require.NoError(t, os.WriteFile(p, []byte(text), 0o600))
			_, err := loadConfig(p)
			require.Error(t, err)
		})
	}
}

func TestApplyConfigFlagsWin(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var cf commonFlags
	cf.register(fs)
	listen := fs.String("listen", "", "")
	kernel := fs.Bool("kernel", false, "")
	idle := fs.Duration("udp-idle", time.Minute, "")
	require.NoError(t, fs.Parse([]string{"--listen", "10.0.0.1:1"}))
	deny := fs.Bool("deny-join-initial", false, "")
	c := serverFileConfig{Listen: "1.1.1.1:2", Kernel: true, Uplinks: []string{"eth0", "eth1,backup"}, UDPIdle: duration{30 * time.Second}, DenyJoinInitial: true}
	require.NoError(t, applyConfig(fs, c.flagValues()))
	require.True(t, *deny)
	require.Equal(t, "10.0.0.1:1", *listen, "command line wins")
	require.True(t, *kernel)
	require.Equal(t, 30*time.Second, *idle)
	require.Len(t, cf.uplinks, 2)
	require.True(t, cf.uplinks[1].Backup)
}
