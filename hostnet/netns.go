package hostnet

import (
	"fmt"
	"os"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
)

// inNS runs fn on a locked OS thread switched into ns. Sysctls under
// /proc/sys/net and TUN creation act on the calling thread's namespace, so
// this is how Close reaches the namespace Setup ran in from any goroutine.
func inNS(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("get current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns: %w", err)
	}
	fnErr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime destroys it when this
		// goroutine exits instead of reusing a thread in the wrong namespace.
		return fmt.Errorf("return to original netns: %w", err)
	}
	runtime.UnlockOSThread()
	return fnErr
}

// sysctlPath maps "net.ipv4.ip_forward" to /proc/sys/net/ipv4/ip_forward.
// Interface names may contain dots, so callers pass them as separate parts.
func sysctlPath(parts ...string) string {
	return "/proc/sys/" + strings.Join(parts, "/")
}

func readSysctl(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return strings.TrimSpace(string(b)), nil
}

func writeSysctl(path, val string) error {
	if err := os.WriteFile(path, []byte(val+"\n"), 0o644); err != nil {
		return fmt.Errorf("write %s=%s: %w", path, val, err)
	}
	return nil
}
