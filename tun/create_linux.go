package tun

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// CreateTUN creates a TUN device. With offloads it is exactly
// wgtun.CreateTUN (virtio-net header, TSO/checksum offload, BatchSize 128).
// Without offloads the device is opened without IFF_VNET_HDR, so the kernel
// hands over MTU-sized packets one per read and wireguard-go reports
// BatchSize 1; useful to compare, and for devices whose packets must not be
// touched by wireguard-go's segmentation/coalescing code.
func CreateTUN(name string, mtu int, offloads bool) (wgtun.Device, error) {
	if offloads {
		dev, err := wgtun.CreateTUN(name, mtu)
		if err != nil {
			return nil, fmt.Errorf("tun: create %q: %w", name, err)
		}
		return dev, nil
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("tun: open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun: interface name %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun: TUNSETIFF %q: %w", name, err)
	}
	// Non-blocking before os.NewFile, so the file goes to the Go poller and
	// supports deadlines (the endpoint stops its reader with one).
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun: set non-blocking: %w", err)
	}
	file := os.NewFile(uintptr(fd), "/dev/net/tun")
	dev, err := wgtun.CreateTUNFromFile(file, mtu)
	if err != nil {
		_ = file.Close()
		return nil, fmt.Errorf("tun: create %q from file: %w", name, err)
	}
	return dev, nil
}
