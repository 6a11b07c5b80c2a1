package tun

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// BenchmarkThroughput measures one TCP flow through the endpoint at MTU
// 1500: kernel socket -> TUN -> gVisor (k2g) and gVisor -> TUN -> kernel
// (g2k), with and without TUN offloads. Run as root:
//
//	go test -run '^$' -bench Throughput -benchtime 2000x ./tun
func BenchmarkThroughput(b *testing.B) {
	requireRoot(b)
	for _, bc := range []struct {
		name                   string
		offloads, gro, hostGSO bool
	}{
		{"offloads/gro", true, true, false},
		{"offloads/nogro", true, false, false},
		{"nooffloads/gro", false, true, false},
		{"offloads/gro/hostgso", true, true, true},
	} {
		for _, dir := range []string{"k2g", "g2k"} {
			b.Run(bc.name+"/"+dir, func(b *testing.B) {
				f := newFixture(b, bc.offloads, 1500)
				ep := newEndpointIn(b, f, Options{GRO: bc.gro, HostGSO: bc.hostGSO})
				s := newStack(b, ep)
				waitReadyIn(b, f.ns, f.name)
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				b.Cleanup(cancel)

				ln, err := gonet.ListenTCP(s, fullAddr(gvAddr4, 0), protoOf(gvAddr4))
				require.NoError(b, err)
				b.Cleanup(func() { _ = ln.Close() })
				accepted := make(chan net.Conn, 1)
				go func() {
					c, err := ln.Accept()
					if err != nil {
						close(accepted)
						return
					}
					accepted <- c
				}()
				var kc net.Conn
				require.NoError(b, inNetns(f.ns, func() error {
					var d net.Dialer
					c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(gvAddr4, uint16(ln.Addr().(*net.TCPAddr).Port)).String())
					kc = c
					return err
				}))
				b.Cleanup(func() { _ = kc.Close() })
				gc, ok := <-accepted
				require.True(b, ok, "accept failed")
				b.Cleanup(func() { _ = gc.Close() })

				src, dst := net.Conn(kc), gc
				if dir == "g2k" {
					src, dst = gc, kc
				}
				const chunk = 1 << 20
				buf := make([]byte, chunk)
				got := make(chan int64, 1)
				go func() {
					n, _ := io.Copy(io.Discard, dst)
					got <- n
				}()
				b.SetBytes(chunk)
				b.ResetTimer()
				start := time.Now()
				for i := 0; i < b.N; i++ {
					if _, err := src.Write(buf); err != nil {
						b.Fatal(err)
					}
				}
				require.NoError(b, src.(interface{ CloseWrite() error }).CloseWrite())
				n := <-got
				elapsed := time.Since(start)
				b.StopTimer()
				require.Equal(b, int64(b.N)*chunk, n)
				b.ReportMetric(float64(n)*8/elapsed.Seconds()/1e9, "Gbit/s")
				st := ep.Stats()
				b.ReportMetric(float64(st.WriteErrors), "write-errs")
				b.ReportMetric(float64(st.Drops+st.ChecksumErrors), "drops")
				if st.ReadBatches > 0 {
					b.ReportMetric(float64(st.PacketsIn)/float64(st.ReadBatches), "pkts/read")
				}
				if st.WriteBatches > 0 {
					b.ReportMetric(float64(st.PacketsOut)/float64(st.WriteBatches), "pkts/write")
				}
			})
		}
	}
}
