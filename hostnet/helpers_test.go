package hostnet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN) to create namespaces, TUNs, routes and nft tables")
	}
}

func randSuffix(t testing.TB) string {
	var b [3]byte
	_, err := rand.Read(b[:])
	require.NoError(t, err)
	return hex.EncodeToString(b[:])
}

// newNS creates a named namespace mth-<rand>-<tag> without leaving the
// calling thread in it, and deletes it on cleanup.
func newNS(t testing.TB, tag string) netns.NsHandle {
	t.Helper()
	name := "mth-" + randSuffix(t) + "-" + tag
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	require.NoError(t, err)
	defer orig.Close()
	ns, err := netns.NewNamed(name)
	require.NoError(t, err)
	require.NoError(t, netns.Set(orig))
	t.Cleanup(func() {
		ns.Close()
		_ = netns.DeleteNamed(name)
	})
	return ns
}

func runIn(t testing.TB, ns netns.NsHandle, fn func() error) {
	t.Helper()
	require.NoError(t, inNS(ns, fn))
}

func nlHandle(t testing.TB, ns netns.NsHandle) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	require.NoError(t, err)
	t.Cleanup(h.Close)
	return h
}

func addAddr(t testing.TB, h *netlink.Handle, ifname, cidr string) {
	t.Helper()
	l, err := h.LinkByName(ifname)
	require.NoError(t, err)
	p := netip.MustParsePrefix(cidr)
	require.NoError(t, h.AddrAdd(l, &netlink.Addr{IPNet: prefixToIPNet(p)}))
	require.NoError(t, h.LinkSetUp(l))
}

// topo is a client namespace with two veth uplinks c0 (10.91.0.2/24,
// default route via 10.91.0.1) and c1 (10.92.0.2/24, no route) to a peer
// namespace, which also owns 10.99.0.1 on its loopback (a "remote server").
type topo struct {
	client, peer     netns.NsHandle
	cnl, pnl         *netlink.Handle
	clientAddrs      []string
	peerAddrs        []string
	serverAddr       netip.Addr
	extraClientLocal netip.Addr // on client lo, routed by the peer via c0
}

func newTopo(t testing.TB) *topo {
	t.Helper()
	tp := &topo{
		client: newNS(t, "c"), peer: newNS(t, "p"),
		clientAddrs:      []string{"10.91.0.2", "10.92.0.2"},
		peerAddrs:        []string{"10.91.0.1", "10.92.0.1"},
		serverAddr:       netip.MustParseAddr("10.99.0.1"),
		extraClientLocal: netip.MustParseAddr("10.95.0.1"),
	}
	tp.cnl, tp.pnl = nlHandle(t, tp.client), nlHandle(t, tp.peer)
	for i, n := range []string{"0", "1"} {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "c" + n}, PeerName: "p" + n,
			PeerNamespace: netlink.NsFd(tp.peer)}
		require.NoError(t, tp.cnl.LinkAdd(veth))
		addAddr(t, tp.cnl, "c"+n, tp.clientAddrs[i]+"/24")
		addAddr(t, tp.pnl, "p"+n, tp.peerAddrs[i]+"/24")
	}
	addAddr(t, tp.pnl, "lo", tp.serverAddr.String()+"/32")
	addAddr(t, tp.cnl, "lo", tp.extraClientLocal.String()+"/32")
	c0, err := tp.cnl.LinkByName("c0")
	require.NoError(t, err)
	require.NoError(t, tp.cnl.RouteAdd(&netlink.Route{LinkIndex: c0.Attrs().Index,
		Dst: prefixToIPNet(netip.MustParsePrefix("0.0.0.0/0")), Gw: net.ParseIP("10.91.0.1")}))
	p0, err := tp.pnl.LinkByName("p0")
	require.NoError(t, err)
	require.NoError(t, tp.pnl.RouteAdd(&netlink.Route{LinkIndex: p0.Attrs().Index,
		Dst: prefixToIPNet(netip.PrefixFrom(tp.extraClientLocal, 32)), Gw: net.ParseIP("10.91.0.2")}))
	// Strict reverse-path filtering on the client's uplinks: the from-rules
	// must keep replies arriving on c1 valid although main routes via c0.
	runIn(t, tp.client, func() error {
		for _, p := range []string{"all", "c0", "c1"} {
			if err := writeSysctl(sysctlPath("net", "ipv4", "conf", p, "rp_filter"), "1"); err != nil {
				return err
			}
		}
		return nil
	})
	return tp
}

// tunStack runs a small gVisor stack on a wireguard TUN, moving packets
// with the batch API, so tests can dial and listen on Uplink.StackAddr.
type tunStack struct {
	s *stack.Stack
}

const tunOffset = 16 // >= virtio-net header (10) that wireguard prepends

func newTUNStack(t testing.TB, dev tun.Device, addr netip.Addr, mtu int) *tunStack {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	ep := channel.New(512, uint32(mtu), "")
	require.Nil(t, s.CreateNIC(1, ep))
	require.Nil(t, s.AddProtocolAddress(1, tcpip.ProtocolAddress{
		Protocol: ipv4.ProtocolNumber, AddressWithPrefix: tcpip.AddrFrom4(addr.As4()).WithPrefix(),
	}, stack.AddressProperties{}))
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: 1}})

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // TUN -> stack
		defer wg.Done()
		n := dev.BatchSize()
		if n < 64 {
			n = 64 // a read batch is one split super-packet: pass plenty
		}
		bufs := make([][]byte, n)
		for i := range bufs {
			bufs[i] = make([]byte, tunOffset+65535)
		}
		sizes := make([]int, n)
		for {
			cnt, err := dev.Read(bufs, sizes, tunOffset)
			if err != nil {
				return // device closed
			}
			for i := range cnt {
				data := append([]byte(nil), bufs[i][tunOffset:tunOffset+sizes[i]]...)
				pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(data)})
				ep.InjectInbound(ipv4.ProtocolNumber, pkt)
				pkt.DecRef()
			}
		}
	}()
	go func() { // stack -> TUN
		defer wg.Done()
		for {
			pkt := ep.ReadContext(ctx)
			if pkt == nil {
				return
			}
			view := pkt.ToView()
			buf := make([]byte, tunOffset+view.Size(), tunOffset+view.Size()+65536)
			copy(buf[tunOffset:], view.AsSlice())
			view.Release()
			pkt.DecRef()
			_, _ = dev.Write([][]byte{buf}, tunOffset)
		}
	}()
	t.Cleanup(func() {
		cancel()
		s.Close()
		// The TUN belongs to Host; closing it early (Close is idempotent)
		// ends the reader so the pump can be waited for here.
		_ = dev.Close()
		wg.Wait()
		s.Wait()
	})
	return &tunStack{s: s}
}
