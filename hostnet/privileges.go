package hostnet

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// capNetAdmin is CAP_NET_ADMIN's bit number (linux/capability.h).
const capNetAdmin = 12

// tunDevicePath is the TUN clone device.
const tunDevicePath = "/dev/net/tun"

// ErrNotPrivileged is returned (wrapped) when the process lacks CAP_NET_ADMIN.
var ErrNotPrivileged = errors.New("not running as root: mptun needs CAP_NET_ADMIN to create TUN devices")

// ErrNoTUN is returned (wrapped) when /dev/net/tun is missing.
var ErrNoTUN = errors.New("TUN is not available: " + tunDevicePath + " is missing (load the tun module or pass the device into the container)")

// CheckPrivileges reports, with a message meant for the user, why Setup
// cannot work: no CAP_NET_ADMIN (not root) or no TUN device.
func CheckPrivileges() error {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return fmt.Errorf("reading capabilities: %w", err)
	}
	defer f.Close()
	eff, err := parseCapEff(f)
	if err != nil {
		return fmt.Errorf("reading capabilities: %w", err)
	}
	if eff&(1<<capNetAdmin) == 0 {
		return ErrNotPrivileged
	}
	return checkTUNDevice(tunDevicePath)
}

func checkTUNDevice(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return ErrNoTUN
		}
		return fmt.Errorf("TUN is not available: %w", err)
	}
	if st.Mode()&os.ModeCharDevice == 0 {
		return fmt.Errorf("TUN is not available: %s is not a character device", path)
	}
	return nil
}

// parseCapEff extracts the effective capability set from /proc/<pid>/status.
func parseCapEff(r io.Reader) (uint64, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "CapEff:")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err != nil {
			return 0, fmt.Errorf("bad CapEff line %q: %w", sc.Text(), err)
		}
		return n, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, errors.New("no CapEff line in status")
}
