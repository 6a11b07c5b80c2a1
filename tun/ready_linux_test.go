package tun

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestWaitReady(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	ns := newNetns(t)
	name := "mtt" + suffix(t)

	state := func() LinkState {
		var st LinkState
		require.NoError(t, inNetns(ns, func() error {
			var err error
			st, err = ReadLinkState(name)
			return err
		}))
		return st
	}
	wait := func(d time.Duration) error {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		return inNetns(ns, func() error { return WaitReady(ctx, name) })
	}

	// No device yet.
	require.False(t, state().Exists)
	require.ErrorIs(t, wait(30*time.Millisecond), context.DeadlineExceeded)

	// A persistent TUN that is up but has no reader attached: no carrier,
	// the kernel would drop what it routes there.
	run(t, "ip", "-n", ns, "tuntap", "add", "dev", name, "mode", "tun", "vnet_hdr")
	t.Cleanup(func() { run(t, "ip", "-n", ns, "link", "del", name) })
	run(t, "ip", "-n", ns, "link", "set", name, "up")
	st := state()
	require.True(t, st.Exists)
	require.True(t, st.Up)
	require.False(t, st.Running, "no reader attached yet: %+v", st)
	require.False(t, st.Ready())
	require.ErrorIs(t, wait(30*time.Millisecond), context.DeadlineExceeded)

	// Attaching the device gives carrier.
	require.NoError(t, inNetns(ns, func() error {
		dev, err := CreateTUN(name, 1500, true)
		if err == nil {
			t.Cleanup(func() { _ = dev.Close() })
		}
		return err
	}))
	start := time.Now()
	require.NoError(t, wait(5*time.Second))
	t.Logf("ready %v after attach: %+v", time.Since(start), state())
	require.True(t, state().Ready())

	// Administratively down: not ready again.
	run(t, "ip", "-n", ns, "link", "set", name, "down")
	require.False(t, state().Ready())
}
