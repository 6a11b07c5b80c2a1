// Package lab builds network topologies in Linux network namespaces for
// tests and benchmarks: a client namespace and a server namespace joined by
// one or more paths, each either a plain veth pair or a pair of veths
// through the userspace link emulator (package linkemu) with its own rate,
// delay, loss and outages. Everything it creates carries a caller-chosen
// prefix and is removed by Topology.Close (or CleanupStale after a crash).
package lab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// NetnsDir is where iproute2 keeps named namespaces.
const NetnsDir = "/run/netns"

// NS is a named network namespace (as created by `ip netns add`). An empty
// Name means the caller's own namespace.
type NS struct {
	Name string
}

// Command returns a command that runs inside the namespace. It is killed
// when ctx ends.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	if n.Name == "" {
		return exec.CommandContext(ctx, name, args...)
	}
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Run runs a command inside the namespace and returns its standard output;
// the error includes standard error.
func (n *NS) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	return run(n.Command(ctx, name, args...))
}

// Do runs fn on an OS thread that has joined the namespace. Sockets fn
// creates stay in the namespace after fn returns, so a listener created in
// Do can be served from any goroutine. The thread is discarded afterwards
// rather than switched back, so no goroutine can ever run in the wrong
// namespace.
func (n *NS) Do(fn func() error) error {
	if n.Name == "" {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the runtime terminates the thread when this
		// goroutine exits.
		runtime.LockOSThread()
		fd, err := unix.Open(NetnsDir+"/"+n.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", n.Name, err)
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.Name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// WriteSysctl writes a /proc/sys value (e.g. "net/ipv4/conf/all/rp_filter")
// of the namespace.
func (n *NS) WriteSysctl(key, value string) error {
	return n.Do(func() error {
		if err := os.WriteFile("/proc/sys/"+key, []byte(value), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s in %s: %w", key, value, n.Name, err)
		}
		return nil
	})
}

// ReadProc reads a per-namespace /proc/net file such as "snmp" or "netstat".
func (n *NS) ReadProc(name string) ([]byte, error) {
	var out []byte
	err := n.Do(func() error {
		var err error
		// thread-self: /proc/self/net follows the main thread's namespace.
		out, err = os.ReadFile("/proc/thread-self/net/" + name)
		if err != nil {
			return fmt.Errorf("read /proc/net/%s in %s: %w", name, n.Name, err)
		}
		return nil
	})
	return out, err
}

func run(cmd *exec.Cmd) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

func ipCmd(ctx context.Context, args ...string) error {
	_, err := run(exec.CommandContext(ctx, "ip", args...))
	return err
}

// IsRoot reports whether the process can create namespaces.
func IsRoot() bool { return os.Geteuid() == 0 }

// NeedRoot skips the test with a clear message unless it runs as root and
// iproute2 is installed: lab topologies need both.
func NeedRoot(tb testing.TB) {
	tb.Helper()
	if !IsRoot() {
		tb.Skip("lab: needs root to create network namespaces (CI runs as root)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		tb.Fatalf("lab: iproute2 missing: %v (run scripts/install-deps.sh)", err)
	}
}

func execIP(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", args...)
}
