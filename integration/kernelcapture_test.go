package integration

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"

	"github.com/mptun/mptun/internal/kernelvectors"
	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/mptcpep/mpkey"
)

const (
	kcClientNS = "mtc-a"
	kcServerNS = "mtc-b"
)

// TestKernelCaptureKnownValues runs a Linux MPTCP client and server in two
// namespaces joined by two veth pairs, captures the traffic and checks our
// header parser and crypto derivations against what the kernel put on the
// wire: token, join HMACs, ADD_ADDR HMAC, IDSN, DSS and MP_CAPABLE checksums.
func TestKernelCaptureKnownValues(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and AF_PACKET sockets")
	}
	for _, tc := range []struct {
		name     string
		checksum bool
		// joins configures path-manager endpoints: a client "subflow"
		// endpoint and a server "signal" endpoint (ADD_ADDR, 2 joins).
		joins bool
		// clientFirst makes the client send first. Without joins nothing
		// reaches the client after the SYN/ACK, so its first data rides on
		// the MP_CAPABLE ACK (the data-carrying, checksummed variant).
		clientFirst bool
	}{
		{name: "joins", joins: true},
		{name: "joins-checksum", checksum: true, joins: true},
		{name: "mpcapable-data-checksum", checksum: true, clientFirst: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kcRunCase(t, tc.checksum, tc.joins, tc.clientFirst)
		})
	}
}

var (
	kcClientIPs = [2]netip.Addr{netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.77.1.1")}
	kcServerIPs = [2]netip.Addr{netip.MustParseAddr("10.77.0.2"), netip.MustParseAddr("10.77.1.2")}
)

func kcSetup(t *testing.T, checksum, joins bool) {
	t.Helper()
	kcNewNetns(t, kcClientNS)
	kcNewNetns(t, kcServerNS)
	csum := "0"
	if checksum {
		csum = "1"
	}
	for _, ns := range []string{kcClientNS, kcServerNS} {
		// Asymmetric paths (replies leave via another veth) must not be
		// dropped by reverse-path filtering.
		kcRun(t, "ip", "netns", "exec", ns, "sysctl", "-q", "-w",
			"net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
			"net.mptcp.enabled=1", "net.mptcp.checksum_enabled="+csum)
		kcRun(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	for i := range 2 {
		a, b := fmt.Sprintf("mtc%da", i), fmt.Sprintf("mtc%db", i)
		kcRun(t, "ip", "link", "add", a, "netns", kcClientNS, "type", "veth", "peer", "name", b, "netns", kcServerNS)
		kcRun(t, "ip", "-n", kcClientNS, "addr", "add", kcClientIPs[i].String()+"/24", "dev", a)
		kcRun(t, "ip", "-n", kcServerNS, "addr", "add", kcServerIPs[i].String()+"/24", "dev", b)
		kcRun(t, "ip", "-n", kcClientNS, "link", "set", a, "up")
		kcRun(t, "ip", "-n", kcServerNS, "link", "set", b, "up")
		// Per-interface default routes (as the kernel selftests do) so a
		// subflow bound to either interface can reach every peer address.
		kcRun(t, "ip", "-n", kcClientNS, "route", "add", "default", "via", kcServerIPs[i].String(), "dev", a, "metric", strconv.Itoa(100+i))
		kcRun(t, "ip", "-n", kcServerNS, "route", "add", "default", "via", kcClientIPs[i].String(), "dev", b, "metric", strconv.Itoa(100+i))
	}
	for _, ns := range []string{kcClientNS, kcServerNS} {
		kcRun(t, "ip", "-n", ns, "mptcp", "limits", "set", "subflows", "2", "add_addr_accepted", "2")
	}
	if joins {
		kcRun(t, "ip", "-n", kcClientNS, "mptcp", "endpoint", "add", kcClientIPs[1].String(), "dev", "mtc1a", "subflow")
		kcRun(t, "ip", "-n", kcServerNS, "mptcp", "endpoint", "add", kcServerIPs[1].String(), "dev", "mtc1b", "signal")
	}
}

func kcRunCase(t *testing.T, withChecksum, joins, clientFirst bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	kcSetup(t, withChecksum, joins)
	capture := kcStartCapture(t, kcClientNS)

	var ln net.Listener
	require.NoError(t, kcInNetns(kcServerNS, func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(true)
		var err error
		// Wildcard: joins towards the announced address must find it.
		ln, err = lc.Listen(ctx, "tcp4", "0.0.0.0:0")
		return err
	}))
	t.Cleanup(func() { ln.Close() })

	clientMsg := []byte("client says hello over mptcp")
	serverMsg := []byte("server answers over multipath tcp")
	// proceed is closed once the joins and ADD_ADDR were seen, so the
	// connection is still open while the path manager works.
	proceed := make(chan struct{})
	srvErr := make(chan error, 1)
	go func() {
		srvErr <- func() error {
			c, err := ln.Accept()
			if err != nil {
				return fmt.Errorf("accept: %w", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(12 * time.Second))
			if mp, err := c.(*net.TCPConn).MultipathTCP(); err != nil || !mp {
				return fmt.Errorf("server side not MPTCP (%v, %w)", mp, err)
			}
			buf := make([]byte, len(clientMsg))
			if clientFirst {
				if _, err := io.ReadFull(c, buf); err != nil {
					return fmt.Errorf("server read: %w", err)
				}
			}
			if _, err := c.Write(serverMsg); err != nil {
				return fmt.Errorf("server write: %w", err)
			}
			if !clientFirst {
				if _, err := io.ReadFull(c, buf); err != nil {
					return fmt.Errorf("server read: %w", err)
				}
			}
			<-proceed
			// More data after the joins, so the new subflows carry DSS too.
			if _, err := c.Write(serverMsg); err != nil {
				return fmt.Errorf("server write: %w", err)
			}
			_, err = io.Copy(io.Discard, c)
			return err
		}()
	}()

	var conn net.Conn
	require.NoError(t, kcInNetns(kcClientNS, func() error {
		var d net.Dialer
		d.SetMultipathTCP(true)
		var err error
		port := ln.Addr().(*net.TCPAddr).Port
		conn, err = d.DialContext(ctx, "tcp4", net.JoinHostPort(kcServerIPs[0].String(), strconv.Itoa(port)))
		return err
	}))
	t.Cleanup(func() { conn.Close() })
	require.NoError(t, conn.SetDeadline(time.Now().Add(12*time.Second)))
	mp, err := conn.(*net.TCPConn).MultipathTCP()
	require.NoError(t, err)
	require.True(t, mp, "client connection fell back to TCP")

	buf := make([]byte, len(serverMsg))
	if clientFirst {
		_, err = conn.Write(clientMsg)
		require.NoError(t, err)
	}
	_, err = io.ReadFull(conn, buf)
	require.NoError(t, err)
	if !clientFirst {
		_, err = conn.Write(clientMsg)
		require.NoError(t, err)
	}

	// Wait until both joins completed (third ACK seen) and ADD_ADDR arrived.
	if joins {
		var last kcResult
		var nframes int
		ok := assert.Eventually(t, func() bool {
			frames := capture.Snapshot()
			nframes = len(frames)
			last = kcAnalyze(t, frames, false)
			return len(last.joinACKs) >= 2 && last.addAddr != nil
		}, 8*time.Second, 50*time.Millisecond)
		require.True(t, ok, "MP_JOINs or ADD_ADDR not observed: %d frames, %d joins completed, %d pending, ADD_ADDR %v",
			nframes, len(last.joinACKs), last.pendingJoins, last.addAddr)
	}
	close(proceed)
	_, err = io.ReadFull(conn, buf)
	require.NoError(t, err)
	// Always a DSS-mapped client write, even when the first one rode on
	// the MP_CAPABLE.
	_, err = conn.Write(clientMsg)
	require.NoError(t, err)
	require.NoError(t, conn.(*net.TCPConn).CloseWrite())
	require.NoError(t, <-srvErr)
	conn.Close()

	r := kcAnalyze(t, capture.Stop(), true)
	kcVerify(t, r, withChecksum, joins, clientFirst)
}

type kcMapping struct {
	dss     header.DSS
	seq     uint32
	isn     uint32
	payload []byte
}

type kcJoin struct {
	syn    header.MPJoinSYN
	synack header.MPJoinSYNACK
	ack    header.MPJoinACK
}

type kcResult struct {
	serverKey, clientKey    uint64 // from MP_CAPABLE
	haveSYNACKKey, haveKeys bool
	mpcSYN, mpcSYNACK       *header.MPCapable
	mpcData                 *header.MPCapable
	mpcDataPayload          []byte
	joinACKs                []kcJoin
	addAddr                 *header.AddAddr
	addAddrEcho             *header.AddAddr
	mappings                [2][]kcMapping  // [0] from client, [1] from server
	dataAcks                [2][]header.DSS // DSS with DATA_ACK sent by client/server, in order
	pendingJoins            int             // join SYNs without a completed handshake
}

func kcIsClient(a netip.Addr) bool { return a == kcClientIPs[0] || a == kcClientIPs[1] }

// kcAnalyze parses every captured TCP segment with the header package.
// strict makes every MPTCP parse error fail the test (the final pass).
func kcAnalyze(t *testing.T, frames []kcFrame, strict bool) kcResult {
	var r kcResult
	type tuple struct{ src, dst netip.AddrPort }
	isn := map[tuple]uint32{}
	pendingJoin := map[tuple]*kcJoin{} // keyed client->server tuple
	for _, f := range frames {
		s, ok := kcDecode(f.data)
		if !ok {
			continue
		}
		src := netip.AddrPortFrom(netip.AddrFrom4(s.src), s.sport)
		dst := netip.AddrPortFrom(netip.AddrFrom4(s.dst), s.dport)
		if !kcIsClient(src.Addr()) && !kcIsClient(dst.Addr()) {
			continue
		}
		fromClient := kcIsClient(src.Addr())
		dir := 1
		if fromClient {
			dir = 0
		}
		syn := s.flags&kcTCPFlagSYN != 0
		ack := s.flags&kcTCPFlagACK != 0
		if syn {
			isn[tuple{src, dst}] = s.seq
		}
		opts, err := header.ParseMPTCP(s.opts)
		if strict {
			require.NoError(t, err, "kernel-generated options must parse: % x", s.opts)
		}
		for _, o := range opts {
			switch o := o.(type) {
			case header.MPCapable:
				switch {
				case syn && !ack:
					r.mpcSYN = &o
				case syn && ack:
					r.mpcSYNACK = &o
					r.serverKey, r.haveSYNACKKey = o.SenderKey, true
				case fromClient:
					r.clientKey, r.haveKeys = o.SenderKey, true
					if strict {
						require.Equal(t, r.serverKey, o.ReceiverKey, "MP_CAPABLE ACK echoes the server key")
					}
					if o.HasDataLen && r.mpcData == nil {
						r.mpcData = &o
						r.mpcDataPayload = s.payload
					}
				}
			case header.MPJoinSYN:
				pendingJoin[tuple{src, dst}] = &kcJoin{syn: o}
			case header.MPJoinSYNACK:
				if j := pendingJoin[tuple{dst, src}]; j != nil {
					j.synack = o
				}
			case header.MPJoinACK:
				if j := pendingJoin[tuple{src, dst}]; j != nil && j.synack.Nonce != 0 {
					j.ack = o
					r.joinACKs = append(r.joinACKs, *j)
					delete(pendingJoin, tuple{src, dst})
				}
			case header.AddAddr:
				if o.Echo {
					r.addAddrEcho = &o
				} else if !fromClient {
					r.addAddr = &o
				}
			case header.DSS:
				if o.HasDataAck {
					r.dataAcks[dir] = append(r.dataAcks[dir], o)
				}
				if o.HasMapping && !syn {
					r.mappings[dir] = append(r.mappings[dir], kcMapping{
						dss: o, seq: s.seq, isn: isn[tuple{src, dst}], payload: s.payload,
					})
				}
			}
		}
	}
	r.pendingJoins = len(pendingJoin)
	return r
}

func kcVerify(t *testing.T, r kcResult, withChecksum, joins, clientFirst bool) {
	require.NotNil(t, r.mpcSYN, "MP_CAPABLE SYN")
	require.Equal(t, 4, r.mpcSYN.Len())
	require.EqualValues(t, header.Version1, r.mpcSYN.Version)
	require.True(t, r.mpcSYN.HMACSHA256)
	require.Equal(t, withChecksum, r.mpcSYN.ChecksumRequired)
	require.True(t, r.haveSYNACKKey && r.haveKeys, "keys from MP_CAPABLE SYN/ACK and ACK")
	serverKey, clientKey := mpkey.Key(r.serverKey), mpkey.Key(r.clientKey)

	// MP_JOIN: token and both HMACs, for every completed join.
	if !joins {
		require.Empty(t, r.joinACKs)
		require.Nil(t, r.addAddr)
	} else {
		kcVerifyJoins(t, r, serverKey, clientKey)
	}
	kcVerifyData(t, r, withChecksum, clientFirst, serverKey, clientKey)
	if path := os.Getenv("MTC_WRITE_KERNEL_VECTORS"); path != "" {
		kcWriteVectors(t, path, r, withChecksum, joins, clientFirst)
	}
}

func kcVerifyJoins(t *testing.T, r kcResult, serverKey, clientKey mpkey.Key) {
	require.GreaterOrEqual(t, len(r.joinACKs), 2)
	for _, j := range r.joinACKs {
		require.Equal(t, serverKey.Token(), j.syn.Token, "join SYN token = Token(server key)")
		require.Equal(t, mpkey.JoinSYNACKHMAC(serverKey, clientKey, j.synack.Nonce, j.syn.Nonce), j.synack.HMAC,
			"join SYN/ACK truncated HMAC")
		require.Equal(t, mpkey.JoinACKHMAC(clientKey, serverKey, j.syn.Nonce, j.synack.Nonce), j.ack.HMAC,
			"join third ACK HMAC")
	}

	// ADD_ADDR from the server, signed with server key || client key.
	require.NotNil(t, r.addAddr)
	require.Equal(t, kcServerIPs[1], r.addAddr.Addr)
	require.Equal(t, mpkey.AddAddrHMAC(serverKey, clientKey, r.addAddr.AddrID, r.addAddr.Addr, r.addAddr.Port), r.addAddr.HMAC)
	require.NotNil(t, r.addAddrEcho, "client echoes ADD_ADDR")
	require.Equal(t, r.addAddr.Addr, r.addAddrEcho.Addr)
}

func kcVerifyData(t *testing.T, r kcResult, withChecksum, clientFirst bool, serverKey, clientKey mpkey.Key) {

	// IDSN: the first data byte of each direction is IDSN+1.
	clientFirstDSN := clientKey.IDSN() + 1
	serverFirstDSN := serverKey.IDSN() + 1
	var mpcLen uint64
	if clientFirst {
		require.NotNil(t, r.mpcData, "client's first data on MP_CAPABLE")
		require.Equal(t, withChecksum, r.mpcData.HasChecksum)
		require.EqualValues(t, len(r.mpcDataPayload), r.mpcData.DataLen)
		mpcLen = uint64(r.mpcData.DataLen)
		if withChecksum {
			sum := checksum.Checksum(r.mpcDataPayload, 0)
			require.Equal(t, header.MPCapableChecksum(clientKey.IDSN(), r.mpcData.DataLen, sum), r.mpcData.Checksum,
				"data-carrying MP_CAPABLE checksum")
		}
	}
	require.NotEmpty(t, r.mappings[0])
	require.NotEmpty(t, r.mappings[1])
	require.Equal(t, clientFirstDSN+mpcLen, kcMinDSN(r.mappings[0]), "client's first DSS mapping")
	require.Equal(t, serverFirstDSN, kcMinDSN(r.mappings[1]), "server's first DSS mapping")
	// The server's first DATA_ACK acknowledges up to IDSN+1 (plus the
	// MP_CAPABLE data); Linux sends it 32 bits wide until it has seen a
	// 64-bit DSN from the peer.
	// It may already cover later client data that arrived before the
	// server acknowledged anything, so it must lie at or just above that.
	require.NotEmpty(t, r.dataAcks[1])
	first := r.dataAcks[1][0]
	want := clientFirstDSN + mpcLen
	ahead := first.DataAck - want
	if !first.DataAck64 {
		ahead = uint64(uint32(first.DataAck) - uint32(want))
	}
	require.Less(t, ahead, uint64(1<<20), "server's first DATA_ACK %#x, want %#x or a little above", first.DataAck, want)

	// DSS checksums: check every mapping whose data sits entirely in its
	// packet (GSO super-packets are captured unsplit on veth).
	checked := 0
	for _, dir := range r.mappings {
		for _, m := range dir {
			require.Equal(t, withChecksum, m.dss.HasChecksum)
			if !withChecksum || int(m.dss.DataLen) != len(m.payload) || m.seq-m.isn != m.dss.SSN {
				continue
			}
			sum := checksum.Checksum(m.payload, 0)
			require.Equal(t, header.DSSChecksum(m.dss.DSN, m.dss.SSN, m.dss.DataLen, sum), m.dss.Checksum,
				"DSS checksum for DSN %d", m.dss.DSN)
			checked++
		}
	}
	if withChecksum {
		require.Positive(t, checked, "no DSS checksum could be checked")
	}

}

func kcMinDSN(ms []kcMapping) uint64 {
	m := ms[0].dss.DSN
	for _, x := range ms[1:] {
		m = min(m, x.dss.DSN)
	}
	return m
}

// kcWriteVectors records one capture's values in the vector file read by
// mptcpep/mpkey's unit tests (merged: the MP_CAPABLE data case is a different
// connection, so it carries its own client key).
func kcWriteVectors(t *testing.T, path string, r kcResult, withChecksum, joins, clientFirst bool) {
	if !withChecksum {
		return
	}
	var v kernelvectors.Vectors
	if _, err := os.Stat(path); err == nil {
		v, err = kernelvectors.Load(path)
		require.NoError(t, err)
	}
	uname, err := os.ReadFile("/proc/sys/kernel/osrelease")
	require.NoError(t, err)
	v.Kernel = strings.TrimSpace(string(uname))
	if joins {
		v.ClientKey, v.ServerKey = r.clientKey, r.serverKey
		j := r.joinACKs[0]
		v.ServerToken = j.syn.Token
		v.ClientFirstDSN = kcMinDSN(r.mappings[0])
		v.ServerFirstDSN = kcMinDSN(r.mappings[1])
		v.Join.ClientNonce, v.Join.ServerNonce = j.syn.Nonce, j.synack.Nonce
		v.Join.SYNACKHMAC = j.synack.HMAC
		v.Join.ACKHMAC = hex.EncodeToString(j.ack.HMAC[:])
		v.AddAddr.ID, v.AddAddr.Addr, v.AddAddr.Port, v.AddAddr.HMAC = r.addAddr.AddrID, r.addAddr.Addr.String(), r.addAddr.Port, r.addAddr.HMAC
		found := false
		for _, m := range r.mappings[1] {
			if int(m.dss.DataLen) == len(m.payload) && m.seq-m.isn == m.dss.SSN {
				v.DSSChecksum.DSN, v.DSSChecksum.SSN, v.DSSChecksum.DataLen = m.dss.DSN, m.dss.SSN, m.dss.DataLen
				v.DSSChecksum.Payload = hex.EncodeToString(m.payload)
				v.DSSChecksum.Checksum = m.dss.Checksum
				found = true
				break
			}
		}
		require.True(t, found, "no self-contained DSS mapping to record")
	}
	if clientFirst {
		require.NotNil(t, r.mpcData)
		v.MPCapableChecksum.ClientKey = r.clientKey
		v.MPCapableChecksum.DataLen = r.mpcData.DataLen
		v.MPCapableChecksum.Payload = hex.EncodeToString(r.mpcDataPayload)
		v.MPCapableChecksum.Checksum = r.mpcData.Checksum
	}
	require.NoError(t, kernelvectors.Save(path, v))
	t.Logf("wrote kernel vectors to %s", path)
}
