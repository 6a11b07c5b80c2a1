package engine

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/hostnet"
)

func TestConfigValidate(t *testing.T) {
	eth0 := []hostnet.UplinkSpec{{Iface: "eth0"}}
	tests := []struct {
		name string
		cfg  Config
		want string // "" when valid
	}{
		{"connect", Config{Mode: hostnet.ModeConnect, Uplinks: eth0}, ""},
		{"listen", Config{Mode: hostnet.ModeListen, Uplinks: eth0, ListenPort: 5000}, ""},
		{"no uplinks", Config{Mode: hostnet.ModeConnect}, "at least one --uplink"},
		{"no mode", Config{Uplinks: eth0}, "unknown mode"},
		{"listen without port", Config{Mode: hostnet.ModeListen, Uplinks: eth0}, "needs a port"},
		{"connect with port", Config{Mode: hostnet.ModeConnect, Uplinks: eth0, ListenPort: 5000}, "listen mode only"},
		{"listen denying joins to the initial address", Config{Mode: hostnet.ModeListen, Uplinks: eth0, ListenPort: 5000, DenyJoinInitialAddr: true}, ""},
		{"connect denying joins to the initial address", Config{Mode: hostnet.ModeConnect, Uplinks: eth0, DenyJoinInitialAddr: true}, "listen mode only"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
			var ce *ConfigError
			require.ErrorAs(t, err, &ce, "a caller tells usage errors apart by type")
		})
	}
}

// TestStartRefusesBadConfigFirst: a bad Config fails before anything
// touches the host, so it needs no privileges and leaves nothing behind.
func TestStartRefusesBadConfigFirst(t *testing.T) {
	e, err := Start(context.Background(), Config{Mode: hostnet.ModeConnect})
	require.Nil(t, e)
	var ce *ConfigError
	require.True(t, errors.As(err, &ce), "%v", err)
}

func TestLocalIDs(t *testing.T) {
	require.Equal(t, uint8(1), LocalID(0), "ID 0 belongs to a connection's initial address")
	require.Equal(t, uint8(3), LocalID(2))
}
