package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/mptun/mptun/mptcpep"
)

// ControlDir holds the daemons' control sockets.
const ControlDir = "/run/mptun"

// SocketPath is the control socket of the daemon whose tunnel is name.
func SocketPath(name string) string { return filepath.Join(ControlDir, name+".sock") }

// Status is what `mptun status` prints.
type Status struct {
	Name     string            `json:"name"`
	PID      int               `json:"pid"`
	Server   string            `json:"server"`
	Started  time.Time         `json:"started"`
	Uplinks  []UplinkStatus    `json:"uplinks"`
	Flows    Stats             `json:"flows"`
	Conns    []ConnStatus      `json:"connections"`
	MIB      map[string]uint64 `json:"mib,omitempty"`
	Interval float64           `json:"rate_interval_s"` // rates are over this last interval
}

// UplinkStatus is one uplink.
type UplinkStatus struct {
	Iface    string `json:"iface"`
	TUN      string `json:"tun"`
	Addr     string `json:"addr"` // the uplink's own address
	Gateway  string `json:"gateway,omitempty"`
	Backup   bool   `json:"backup"`
	Up       bool   `json:"up"`
	Subflows int    `json:"subflows"` // established subflows over it
	TxBps    uint64 `json:"tx_bps"`   // sum over its subflows
	RxBps    uint64 `json:"rx_bps"`
}

// ConnStatus is one MPTCP connection to the concentrator.
type ConnStatus struct {
	Local         string          `json:"local"`
	Remote        string          `json:"remote"`
	MPTCP         bool            `json:"mptcp"`
	BytesSent     uint64          `json:"bytes_sent"`
	BytesReceived uint64          `json:"bytes_received"`
	Reinjected    uint64          `json:"reinjected"`
	Subflows      []SubflowStatus `json:"subflows"`
}

// SubflowStatus is one subflow with rates over the last interval.
type SubflowStatus struct {
	Local       string  `json:"local"`
	Remote      string  `json:"remote"`
	LocalID     uint8   `json:"local_id"`
	State       string  `json:"state"`
	Backup      bool    `json:"backup"`
	RTTms       float64 `json:"rtt_ms"`
	Cwnd        uint32  `json:"cwnd"`
	BytesSent   uint64  `json:"bytes_sent"`
	BytesRecv   uint64  `json:"bytes_received"`
	TxBps       uint64  `json:"tx_bps"`
	RxBps       uint64  `json:"rx_bps"`
	Retransmits uint64  `json:"retransmits"`
	// LossPct estimates loss as retransmitted segments per segment sent
	// (segments counted as bytes sent / 1400), over the subflow's life.
	LossPct float64 `json:"loss_pct"`
	Error   string  `json:"error,omitempty"`
	// Congestion control: our controller's state and estimates (empty
	// with gVisor's own).
	CC        string  `json:"cc,omitempty"`
	CCState   string  `json:"cc_state,omitempty"`
	PacingBps uint64  `json:"pacing_bps,omitempty"`
	BtlBwBps  uint64  `json:"btlbw_bps,omitempty"`
	MinRTTms  float64 `json:"min_rtt_ms,omitempty"`
}

// RateMeter turns cumulative subflow byte counters into rates by sampling
// them periodically.
type RateMeter struct {
	mu       sync.Mutex
	prev     map[rateKey][2]uint64
	at       time.Time
	rates    map[rateKey][2]uint64
	interval time.Duration
}

type rateKey struct {
	conn          *mptcpep.Conn
	local, remote string
}

// NewRateMeter returns an empty meter.
func NewRateMeter() *RateMeter {
	return &RateMeter{prev: map[rateKey][2]uint64{}, rates: map[rateKey][2]uint64{}}
}

// Sample records the counters of conns at now.
func (m *RateMeter) Sample(now time.Time, conns []*mptcpep.Conn) {
	cur := map[rateKey][2]uint64{}
	for _, c := range conns {
		for _, sf := range c.Stats().Subflows {
			cur[rateKey{c, sf.Local.String(), sf.Remote.String()}] = [2]uint64{sf.BytesSent, sf.BytesReceived}
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	rates := map[rateKey][2]uint64{}
	if !m.at.IsZero() {
		dt := now.Sub(m.at).Seconds()
		for k, v := range cur {
			p := m.prev[k]
			if dt > 0 && v[0] >= p[0] && v[1] >= p[1] {
				rates[k] = [2]uint64{uint64(float64(v[0]-p[0]) * 8 / dt), uint64(float64(v[1]-p[1]) * 8 / dt)}
			}
		}
		m.interval = now.Sub(m.at)
	}
	m.prev, m.rates, m.at = cur, rates, now
}

// Run samples every interval until ctx ends.
func (m *RateMeter) Run(ctx context.Context, interval time.Duration, conns func() []*mptcpep.Conn) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			m.Sample(now, conns())
		}
	}
}

// Conns builds the connection part of a Status, with the last rates.
func (m *RateMeter) Conns(conns []*mptcpep.Conn) ([]ConnStatus, time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []ConnStatus
	for _, c := range conns {
		s := c.Stats()
		cs := ConnStatus{Local: s.Local, Remote: s.Remote, MPTCP: s.MPTCP, BytesSent: s.BytesSent,
			BytesReceived: s.BytesReceived, Reinjected: s.Reinjected}
		for _, sf := range s.Subflows {
			r := m.rates[rateKey{c, sf.Local.String(), sf.Remote.String()}]
			ss := SubflowStatus{Local: sf.Local.String(), Remote: sf.Remote.String(), LocalID: sf.LocalID,
				State: sf.State, Backup: sf.Backup, RTTms: float64(sf.RTT.Microseconds()) / 1000, Cwnd: sf.Cwnd,
				BytesSent: sf.BytesSent, BytesRecv: sf.BytesReceived, TxBps: r[0], RxBps: r[1],
				Retransmits: sf.Retransmits, Error: sf.Error,
				CC: sf.CC.Name, CCState: sf.CC.State, PacingBps: sf.CC.PacingRate * 8, BtlBwBps: sf.CC.BtlBw * 8, MinRTTms: sf.CC.MinRTT * 1e3}
			if segs := sf.BytesSent / 1400; segs > 0 {
				ss.LossPct = 100 * float64(sf.Retransmits) / float64(segs)
			}
			cs.Subflows = append(cs.Subflows, ss)
		}
		out = append(out, cs)
	}
	return out, m.interval
}

// ServeControl answers every connection on the unix socket at path with the
// JSON of status() until ctx ends. The socket is mode 0600 in a 0700
// directory, and peers other than root are turned away.
func ServeControl(ctx context.Context, path string, status func() any, log *slog.Logger) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	// A socket file left by a killed daemon: remove it if nobody answers.
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s is in use: another mptun client with this tunnel name runs", path)
	}
	_ = os.Remove(path)
	old := syscall.Umask(0o077)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			uc := c.(*net.UnixConn)
			if uid, err := peerUID(uc); err != nil || uid != 0 {
				log.Warn("control socket: refusing non-root peer", "uid", uid, "err", err)
				c.Close()
				continue
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if err := json.NewEncoder(c).Encode(status()); err != nil {
				log.Debug("control socket: write", "err", err)
			}
			c.Close()
		}
	}()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	return func() {
		stop()
		ln.Close()
		wg.Wait()
		// net.UnixListener removes the file on Close.
	}, nil
}

func peerUID(c *net.UnixConn) (int, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	var cred *syscall.Ucred
	var cerr error
	err = raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	if err != nil {
		return -1, err
	}
	if cerr != nil {
		return -1, cerr
	}
	return int(cred.Uid), nil
}

// QueryControl reads the status JSON from the daemon at path.
func QueryControl(ctx context.Context, path string) (json.RawMessage, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("no mptun client is running (%s): %w", path, err)
		}
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	var raw json.RawMessage
	if err := json.NewDecoder(c).Decode(&raw); err != nil {
		return nil, fmt.Errorf("control socket %s: read status: %w", path, err)
	}
	return raw, nil
}
