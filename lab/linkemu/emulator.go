package linkemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Config describes an emulated link between two interfaces of the
// namespace the emulator is opened in.
type Config struct {
	IfA, IfB string
	// AtoB shapes frames read on IfA and sent on IfB; BtoA the reverse.
	AtoB, BtoA Params
	// Epoch is the time outages are relative to; zero means the start of Run.
	// Give several emulators the same Epoch to script a whole scenario.
	Epoch time.Time
	// MaxInFlight bounds frames held per direction (queue plus delay line);
	// beyond it frames are dropped as overflow. Default 32768.
	MaxInFlight int
	Logger      *slog.Logger
}

// Dir names a direction of the link.
type Dir int

// Directions of an Emulator.
const (
	AtoB Dir = iota
	BtoA
)

// DirStats are cumulative counters of one direction.
type DirStats struct {
	RxFrames, RxBytes uint64 // read from the ingress interface
	TxFrames, TxBytes uint64 // written to the egress interface
	DropLoss          uint64 // random loss
	DropQueue         uint64 // rate limiter queue full
	DropOutage        uint64 // link down
	DropOverflow      uint64 // MaxInFlight exceeded or oversized frame
	DropSend          uint64 // kernel refused the frame on egress
	// DropRx counts frames the kernel dropped before the emulator read
	// them (socket buffer full): the emulator is overloaded. Updated by
	// Stats and at the end of Run.
	DropRx uint64
}

type counters struct {
	rxFrames, rxBytes, txFrames, txBytes                         atomic.Uint64
	dropLoss, dropQueue, dropOutage, dropOverflow, dropSendStats atomic.Uint64
	dropRx                                                       atomic.Uint64
}

type frame struct {
	buf *[]byte
	n   int
	at  time.Time
}

type direction struct {
	name      string
	in, out   *packetSock
	params    Params
	bufLen    int
	q         chan frame
	pool      sync.Pool
	forceDown atomic.Bool
	epoch     atomic.Int64 // unix nanoseconds; outages are relative to it
	c         counters
}

// Emulator forwards frames between two interfaces. Create it with Open in
// the emulator's namespace; Run may then be called from any goroutine since
// sockets stay bound to the namespace they were created in.
type Emulator struct {
	cfg   Config
	dirs  [2]*direction
	socks [2]*packetSock
	log   *slog.Logger
	ran   atomic.Bool
	// statsMu serialises read-and-reset of the kernel drop counters.
	statsMu sync.Mutex
}

// Open validates cfg and opens the AF_PACKET sockets. It must be called
// from a thread in the namespace owning both interfaces.
func Open(cfg Config) (*Emulator, error) {
	if err := errors.Join(cfg.AtoB.Validate(), cfg.BtoA.Validate()); err != nil {
		return nil, fmt.Errorf("linkemu config: %w", err)
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = 32768
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a, err := openPacketSock(cfg.IfA)
	if err != nil {
		return nil, err
	}
	b, err := openPacketSock(cfg.IfB)
	if err != nil {
		a.Close()
		return nil, err
	}
	mtuA, errA := ifaceMTU(cfg.IfA)
	mtuB, errB := ifaceMTU(cfg.IfB)
	if err := errors.Join(errA, errB); err != nil {
		a.Close()
		b.Close()
		return nil, err
	}
	e := &Emulator{cfg: cfg, socks: [2]*packetSock{a, b}, log: log}
	e.dirs[AtoB] = newDirection(cfg.IfA+">"+cfg.IfB, a, b, cfg.AtoB, mtuA, cfg.MaxInFlight)
	e.dirs[BtoA] = newDirection(cfg.IfB+">"+cfg.IfA, b, a, cfg.BtoA, mtuB, cfg.MaxInFlight)
	return e, nil
}

func ifaceMTU(name string) (int, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return 0, fmt.Errorf("interface %s: %w", name, err)
	}
	return ifi.MTU, nil
}

func newDirection(name string, in, out *packetSock, p Params, mtu, inflight int) *direction {
	// Ethernet header plus a VLAN tag; one spare byte detects truncation.
	bufLen := min(mtu, bufSize) + 18 + 1
	d := &direction{name: name, in: in, out: out, params: p, bufLen: bufLen, q: make(chan frame, inflight)}
	d.pool.New = func() any { b := make([]byte, bufLen); return &b }
	return d
}

// SetEpoch moves the time scripted outages are relative to, e.g. to the
// start of a measurement. Safe to call while Run is active.
func (e *Emulator) SetEpoch(t time.Time) {
	for _, d := range e.dirs {
		d.epoch.Store(t.UnixNano())
	}
}

// SetDown forces a direction down (true) or lets it follow its script again.
func (e *Emulator) SetDown(d Dir, down bool) { e.dirs[d].forceDown.Store(down) }

// Stats returns the counters of direction d.
func (e *Emulator) Stats(d Dir) DirStats {
	e.pollKernelDrops()
	c := &e.dirs[d].c
	return DirStats{
		RxFrames: c.rxFrames.Load(), RxBytes: c.rxBytes.Load(),
		TxFrames: c.txFrames.Load(), TxBytes: c.txBytes.Load(),
		DropLoss: c.dropLoss.Load(), DropQueue: c.dropQueue.Load(),
		DropOutage: c.dropOutage.Load(), DropOverflow: c.dropOverflow.Load(),
		DropSend: c.dropSendStats.Load(), DropRx: c.dropRx.Load(),
	}
}

// pollKernelDrops folds the sockets' kernel drop counters (which reset on
// read) into the directions reading them. Closed sockets report errors,
// after which the last folded value stands.
func (e *Emulator) pollKernelDrops() {
	e.statsMu.Lock()
	defer e.statsMu.Unlock()
	for _, d := range e.dirs {
		if n, err := d.in.kernelDrops(); err == nil {
			d.c.dropRx.Add(n)
		}
	}
}

// Close releases the sockets of an emulator that was never Run.
func (e *Emulator) Close() error {
	if e.ran.Load() {
		return nil // Run closes them.
	}
	return errors.Join(e.socks[0].Close(), e.socks[1].Close())
}

// Run forwards frames until ctx is cancelled, then closes the sockets.
// It returns nil on cancellation and the first I/O error otherwise.
func (e *Emulator) Run(ctx context.Context) error {
	if !e.ran.CompareAndSwap(false, true) {
		return errors.New("linkemu: Run called twice")
	}
	epoch := e.cfg.Epoch
	if epoch.IsZero() {
		epoch = time.Now()
	}
	for _, d := range e.dirs {
		if d.epoch.Load() == 0 {
			d.epoch.Store(epoch.UnixNano())
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 4)
	var wg sync.WaitGroup
	for _, d := range e.dirs {
		sh := newShaper(d.params, time.Unix(0, d.epoch.Load()))
		wg.Add(2)
		// A failing loop stops the whole emulator: half a link is worse than none.
		go func() { defer wg.Done(); err := d.readLoop(ctx, sh); errc <- err; stopOn(err, cancel) }()
		go func() { defer wg.Done(); err := d.writeLoop(ctx); errc <- err; stopOn(err, cancel) }()
	}
	<-ctx.Done()
	e.pollKernelDrops()
	closeErr := errors.Join(e.socks[0].Close(), e.socks[1].Close())
	wg.Wait()
	close(errc)
	var first error
	for err := range errc {
		if err != nil && !errors.Is(err, os.ErrClosed) && first == nil {
			first = err
		}
	}
	if first == nil && closeErr != nil {
		first = fmt.Errorf("linkemu close: %w", closeErr)
	}
	e.log.Debug("linkemu stopped", "ab", e.Stats(AtoB), "ba", e.Stats(BtoA), "err", first)
	return first
}

func stopOn(err error, cancel context.CancelFunc) {
	if err != nil {
		cancel()
	}
}

func (d *direction) get() *[]byte { return d.pool.Get().(*[]byte) }

func (d *direction) readLoop(ctx context.Context, sh *shaper) error {
	var m mmsgs
	var bufs [batch]*[]byte
	slices := make([][]byte, batch)
	lens := make([]int, batch)
	defer func() {
		for _, b := range bufs {
			if b != nil {
				d.pool.Put(b)
			}
		}
	}()
	for ctx.Err() == nil {
		for i := range bufs {
			if bufs[i] == nil {
				bufs[i] = d.get()
			}
			slices[i] = *bufs[i]
		}
		n, err := d.in.readBatch(&m, slices, lens)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		now := time.Now()
		down := d.forceDown.Load()
		if ep := d.epoch.Load(); ep != sh.epoch.UnixNano() {
			sh.epoch = time.Unix(0, ep)
		}
		for i := range n {
			size := lens[i]
			d.c.rxFrames.Add(1)
			d.c.rxBytes.Add(uint64(size))
			if size >= d.bufLen {
				d.c.dropOverflow.Add(1) // truncated: larger than the MTU allows
				continue
			}
			if down {
				d.c.dropOutage.Add(1)
				continue
			}
			at, v := sh.admit(now, size)
			switch v {
			case DropLoss:
				d.c.dropLoss.Add(1)
				continue
			case DropQueue:
				d.c.dropQueue.Add(1)
				continue
			case DropOutage:
				d.c.dropOutage.Add(1)
				continue
			}
			select {
			case d.q <- frame{buf: bufs[i], n: size, at: at}:
				bufs[i] = nil
			default:
				d.c.dropOverflow.Add(1)
			}
		}
	}
	return nil
}

// slack is how early a frame may leave: waking a timer for each frame at
// high rates would cost more than the 50 µs of accuracy it buys.
const slack = 50 * time.Microsecond

func (d *direction) writeLoop(ctx context.Context) error {
	var m mmsgs
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	out := make([][]byte, 0, batch)
	held := make([]*[]byte, 0, batch)
	var next *frame
	for {
		var f frame
		if next != nil {
			f, next = *next, nil
		} else {
			select {
			case f = <-d.q:
			case <-ctx.Done():
				return nil
			}
		}
		if wait := time.Until(f.at); wait > slack {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-ctx.Done():
				d.pool.Put(f.buf)
				return nil
			}
		}
		now := time.Now()
		out, held = out[:0], held[:0]
		isDown := d.forceDown.Load() || downAt(d.params.Outages, time.Unix(0, d.epoch.Load()), now)
		add := func(f frame) {
			if isDown {
				d.c.dropOutage.Add(1)
				d.pool.Put(f.buf)
				return
			}
			out = append(out, (*f.buf)[:f.n])
			held = append(held, f.buf)
		}
		add(f)
		// Gather every further frame already due into the same sendmmsg.
	gather:
		for len(out) < batch {
			select {
			case g := <-d.q:
				if g.at.Sub(now) > slack {
					next = &g
					break gather
				}
				add(g)
			default:
				break gather
			}
		}
		if len(out) > 0 {
			dropped, err := d.out.writeBatch(&m, out)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			var bytes uint64
			for _, b := range out {
				bytes += uint64(len(b))
			}
			d.c.txFrames.Add(uint64(len(out) - dropped))
			d.c.txBytes.Add(bytes)
			d.c.dropSendStats.Add(uint64(dropped))
		}
		for _, b := range held {
			d.pool.Put(b)
		}
	}
}
