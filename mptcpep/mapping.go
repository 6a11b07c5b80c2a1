package mptcpep

import (
	"errors"
	"fmt"
	"sort"
)

const (
	// maxRxMappings bounds the mappings a peer can make one subflow keep.
	// The kernel has a handful in flight per subflow (one per GSO
	// super-segment of up to 64 KiB), so 1024 covers a 64 MiB window.
	maxRxMappings = 1024
	// maxMappingLen is the largest data-level length a DSS option can
	// carry (16 bits).
	maxMappingLen = 65535
	// maxRxMappingAhead bounds how far beyond the consumed offset a
	// mapping may start: no TCP receive window exceeds 1 GiB (RFC 7323).
	maxRxMappingAhead = 1 << 30
)

var (
	// ErrMappingConflict reports a DSS mapping that maps subflow bytes
	// already mapped to other DSNs (RFC 8684 §3.3.1: the subflow must be
	// reset, or the connection fall back).
	ErrMappingConflict = errors.New("mptcpep: DSS mapping conflicts with an earlier one")
	// ErrTooManyMappings reports a mapping dropped because the table is
	// full.
	ErrTooManyMappings = errors.New("mptcpep: too many DSS mappings")
	// ErrBadMapping reports a mapping with an invalid length.
	ErrBadMapping = errors.New("mptcpep: invalid DSS mapping")
	// ErrNonContiguous reports a send-side mapping that does not start
	// where the subflow stream ends.
	ErrNonContiguous = errors.New("mptcpep: subflow mapping not contiguous")
)

// rxMapping is a DSS mapping announced by the peer: subflow bytes
// [SSN, SSN+Len) carry DSNs [DSN, DSN+Len).
//
// Len counts data bytes only. On the wire the data-level length of a
// mapping with DATA_FIN includes one for the FIN; the option parser
// subtracts it and sets DataFin, and the FIN's DSN is then DSN+Len. A pure
// DATA_FIN (data-level length 1, no data) has no subflow bytes: the caller
// hands it to reassembly.SetFin directly instead of Add.
type rxMapping struct {
	SSN      uint32 // relative subflow sequence number of the first byte
	DSN      uint64
	Len      int
	DataFin  bool
	HasCsum  bool
	Checksum uint16
}

func (m rxMapping) end() uint32 { return m.SSN + uint32(m.Len) }

// sameMap reports whether m and o place their common bytes at the same
// DSNs.
func (m rxMapping) sameMap(o rxMapping) bool {
	if ssnLEQ(o.SSN, m.SSN) {
		return o.DSN+uint64(m.SSN-o.SSN) == m.DSN
	}
	return m.DSN+uint64(o.SSN-m.SSN) == o.DSN
}

// rxMappings is one subflow's table of received DSS mappings, ordered by
// SSN, from which the connection learns the DSN of every subflow byte it
// reads. Bytes are consumed in subflow order; mappings entirely below the
// consumed offset are dropped.
//
// SSNs are compared wrap-safely within 2^31 of the consumed offset.
// Not safe for concurrent use: the caller holds the connection lock.
type rxMappings struct {
	consumed uint32      // every byte below this SSN was read
	maps     []rxMapping // sorted by SSN, non-overlapping; maps[head:] live
	head     int
	last     int // index of the last Lookup hit, to make in-order reads O(1)
}

// newRxMappings returns a table whose next byte to consume is at SSN
// first (1 for the first data byte after the handshake).
func newRxMappings(first uint32) *rxMappings {
	return &rxMappings{consumed: first}
}

// Len returns the number of mappings held.
func (t *rxMappings) Len() int { return len(t.maps) - t.head }

// Add records a mapping. A mapping equal to one held is a no-op (the
// kernel repeats its mapping on every segment of a GSO super-segment, and
// on retransmissions). A mapping overlapping others but placing the common
// bytes at the same DSNs extends them (only without checksums, since a
// checksum covers exactly one mapping). A mapping entirely below the
// consumed offset is ignored. Anything else that overlaps returns
// ErrMappingConflict; a full table returns ErrTooManyMappings.
func (t *rxMappings) Add(m rxMapping) error {
	if m.Len <= 0 || m.Len > maxMappingLen {
		return fmt.Errorf("length %d: %w", m.Len, ErrBadMapping)
	}
	if ssnLEQ(m.end(), t.consumed) {
		return nil
	}
	if ssnLT(t.consumed, m.SSN) && m.SSN-t.consumed > maxRxMappingAhead {
		// Keeps every SSN held within 2^31 of consumed, where the
		// wrap-safe order is consistent.
		return fmt.Errorf("SSN %d too far ahead of %d: %w", m.SSN, t.consumed, ErrBadMapping)
	}
	live := t.maps[t.head:]
	// Fast path: the newest mapping repeated, or the next one in order.
	if n := len(live); n > 0 {
		lastM := live[n-1]
		if m == lastM {
			return nil
		}
		if ssnLEQ(lastM.end(), m.SSN) {
			return t.insertAt(len(t.maps), m)
		}
	} else {
		return t.insertAt(len(t.maps), m)
	}

	// i: first live mapping ending after m.SSN; j: first starting at or
	// after m's end. [i, j) overlap m.
	i := t.head + sort.Search(len(live), func(k int) bool { return ssnLT(m.SSN, live[k].end()) })
	j := i
	for j < len(t.maps) && ssnLT(t.maps[j].SSN, m.end()) {
		j++
	}
	if i == j {
		return t.insertAt(i, m)
	}
	if j == i+1 && t.maps[i] == m {
		return nil
	}
	merged := m
	for _, o := range t.maps[i:j] {
		if !o.sameMap(m) || o.HasCsum || m.HasCsum {
			return fmt.Errorf("SSN %d len %d -> DSN %d, held SSN %d len %d -> DSN %d: %w",
				m.SSN, m.Len, m.DSN, o.SSN, o.Len, o.DSN, ErrMappingConflict)
		}
		if ssnLT(o.SSN, merged.SSN) {
			merged.Len += int(merged.SSN - o.SSN)
			merged.DSN = o.DSN
			merged.SSN = o.SSN
		}
		if ssnLT(merged.end(), o.end()) {
			merged.Len = int(o.end() - merged.SSN)
		}
	}
	// A DATA_FIN must stay at the end: data mapped beyond a FIN conflicts.
	for _, o := range append(t.maps[i:j:j], m) {
		if o.DataFin && o.end() != merged.end() {
			return fmt.Errorf("data mapped beyond DATA_FIN at SSN %d: %w", o.end(), ErrMappingConflict)
		}
		if o.DataFin {
			merged.DataFin = true
		}
	}
	t.maps[i] = merged
	t.maps = append(t.maps[:i+1], t.maps[j:]...)
	t.last = i
	return nil
}

func (t *rxMappings) insertAt(i int, m rxMapping) error {
	if t.Len() >= maxRxMappings {
		return fmt.Errorf("SSN %d: %w", m.SSN, ErrTooManyMappings)
	}
	if t.head > 0 && len(t.maps) == cap(t.maps) {
		// Reclaim the consumed prefix instead of growing.
		n := copy(t.maps, t.maps[t.head:])
		i -= t.head
		t.last = max(t.last-t.head, 0)
		t.maps = t.maps[:n]
		t.head = 0
	}
	t.maps = append(t.maps, rxMapping{})
	copy(t.maps[i+1:], t.maps[i:])
	t.maps[i] = m
	return nil
}

// Find returns the mapping covering subflow byte ssn.
func (t *rxMappings) Find(ssn uint32) (rxMapping, bool) {
	// In-order reads hit the same mapping or the next one.
	for _, k := range [2]int{t.last, t.last + 1} {
		if k >= t.head && k < len(t.maps) && covers(t.maps[k].SSN, t.maps[k].Len, ssn) {
			t.last = k
			return t.maps[k], true
		}
	}
	live := t.maps[t.head:]
	k := sort.Search(len(live), func(k int) bool { return ssnLT(ssn, live[k].end()) })
	if k < len(live) && covers(live[k].SSN, live[k].Len, ssn) {
		t.last = t.head + k
		return live[k], true
	}
	return rxMapping{}, false
}

// Lookup returns the DSN of subflow byte ssn and how many bytes from ssn
// on the same mapping still covers.
func (t *rxMappings) Lookup(ssn uint32) (dsn uint64, n int, ok bool) {
	m, ok := t.Find(ssn)
	if !ok {
		return 0, 0, false
	}
	off := ssn - m.SSN
	return m.DSN + uint64(off), m.Len - int(off), true
}

// Consume records that the subflow bytes below upTo were read and drops
// the mappings entirely below it.
func (t *rxMappings) Consume(upTo uint32) {
	if ssnLEQ(upTo, t.consumed) {
		return
	}
	t.consumed = upTo
	for t.head < len(t.maps) && ssnLEQ(t.maps[t.head].end(), upTo) {
		t.maps[t.head] = rxMapping{}
		t.head++
	}
	if t.head == len(t.maps) {
		t.maps = t.maps[:0]
		t.head = 0
	}
	t.last = max(t.last, t.head)
}

// covers reports whether [start, start+n) contains ssn, wrap-safely.
func covers(start uint32, n int, ssn uint32) bool {
	return ssnLEQ(start, ssn) && ssnLT(ssn, start+uint32(n))
}

// span is a range of DSNs.
type span struct {
	DSN uint64
	Len int
}

// txMapping records that subflow bytes [SSN, SSN+Len) carry DSNs
// [DSN, DSN+Len).
type txMapping struct {
	SSN uint32
	DSN uint64
	Len int
	// Sum is the ones'-complement sum of the mapping's data (for the DSS
	// checksum; zero when checksums are off).
	Sum uint16
	// sealed: the mapping went out in a DSS option, so it must never grow
	// (a peer rejects a different mapping for bytes it already holds).
	sealed bool
}

func (m txMapping) end() uint32 { return m.SSN + uint32(m.Len) }

// txMappings is one subflow's table of what the scheduler wrote into it:
// the option layer announces these mappings in DSS options, the same
// mapping on every segment (and retransmission) of its bytes.
//
// Add cuts mappings at maxMappingLen itself, at fixed points, rather than
// leaving it to the option writer: a peer (Linux) rejects a different
// mapping for bytes it already holds a mapping for, so the mapping of a
// byte must never depend on how gVisor segments or retransmits it.
//
// The table is bounded by the subflow's send buffer (entries are dropped
// when the subflow ACK covers them), not by peer input. Not safe for
// concurrent use.
type txMappings struct {
	next  uint32 // SSN following the last byte added
	acked uint32 // subflow-level ACK: bytes below are acknowledged
	maps  []txMapping
	head  int
	last  int
}

// newTxMappings returns a table whose first data byte is at SSN first.
func newTxMappings(first uint32) *txMappings {
	return &txMappings{next: first, acked: first}
}

// Len returns the number of mappings held.
func (t *txMappings) Len() int { return len(t.maps) - t.head }

// Next returns the SSN the next Add must start at.
func (t *txMappings) Next() uint32 { return t.next }

// Add records that n bytes with DSNs from dsn were written to the subflow
// at SSN ssn. Subflow bytes are written in order, so ssn must equal
// Next(); otherwise it returns ErrNonContiguous. Contiguous data (in SSN
// and DSN) extends the last mapping up to maxMappingLen.
func (t *txMappings) Add(ssn uint32, dsn uint64, n int) error {
	return t.AddSum(ssn, dsn, n, 0)
}

// AddSum is Add for data whose ones'-complement sum is sum. A mapping that
// was already announced (Seal) is never extended.
func (t *txMappings) AddSum(ssn uint32, dsn uint64, n int, sum uint16) error {
	if ssn != t.next {
		return fmt.Errorf("SSN %d, expected %d: %w", ssn, t.next, ErrNonContiguous)
	}
	if n <= 0 {
		return nil
	}
	t.next += uint32(n)
	// Every chunk gets a mapping of its own (no extension of the previous
	// one): a mapping may already be on the wire, and its data sum must be
	// that of exactly its bytes.
	for n > 0 {
		c := min(n, maxMappingLen)
		if t.head > 0 && len(t.maps) == cap(t.maps) {
			k := copy(t.maps, t.maps[t.head:])
			t.maps = t.maps[:k]
			t.last = max(t.last-t.head, 0)
			t.head = 0
		}
		m := txMapping{SSN: ssn, DSN: dsn, Len: c}
		if c == n {
			m.Sum = sum
		}
		t.maps = append(t.maps, m)
		ssn += uint32(c)
		dsn += uint64(c)
		n -= c
	}
	return nil
}

// Seal marks the mapping covering ssn as announced.
func (t *txMappings) Seal(ssn uint32) {
	if t.last >= t.head && t.last < len(t.maps) && covers(t.maps[t.last].SSN, t.maps[t.last].Len, ssn) {
		t.maps[t.last].sealed = true
		return
	}
	for i := t.head; i < len(t.maps); i++ {
		if covers(t.maps[i].SSN, t.maps[i].Len, ssn) {
			t.maps[i].sealed = true
			return
		}
	}
}

// Find returns the mapping covering subflow byte ssn, for the DSS option
// of a segment starting there.
func (t *txMappings) Find(ssn uint32) (txMapping, bool) {
	// gVisor sends segments in order, so the next lookup hits the last
	// mapping or the one after it.
	for _, k := range [2]int{t.last, t.last + 1} {
		if k >= t.head && k < len(t.maps) && covers(t.maps[k].SSN, t.maps[k].Len, ssn) {
			t.last = k
			return t.maps[k], true
		}
	}
	live := t.maps[t.head:]
	k := sort.Search(len(live), func(k int) bool { return ssnLT(ssn, live[k].end()) })
	if k < len(live) && covers(live[k].SSN, live[k].Len, ssn) {
		t.last = t.head + k
		return live[k], true
	}
	return txMapping{}, false
}

// Lookup returns the DSN of subflow byte ssn and how many bytes from ssn
// on share its mapping, so the option layer can split a segment that
// spans two mappings.
func (t *txMappings) Lookup(ssn uint32) (dsn uint64, contiguousLen int, ok bool) {
	m, ok := t.Find(ssn)
	if !ok {
		return 0, 0, false
	}
	off := ssn - m.SSN
	return m.DSN + uint64(off), m.Len - int(off), true
}

// Ack records the subflow-level ACK (the relative SSN the peer expects
// next) and drops the mappings it fully covers. Old ACKs are ignored; one
// beyond Next (a subflow FIN takes a sequence number) counts as Next.
// Partly acknowledged mappings stay whole: retransmissions of their tail
// repeat the full mapping.
func (t *txMappings) Ack(ssn uint32) {
	if ssnLT(t.next, ssn) {
		// A subflow FIN takes one sequence number beyond the data.
		ssn = t.next
	}
	if ssnLEQ(ssn, t.acked) {
		return
	}
	t.acked = ssn
	for t.head < len(t.maps) && ssnLEQ(t.maps[t.head].end(), ssn) {
		t.maps[t.head] = txMapping{}
		t.head++
	}
	if t.head == len(t.maps) {
		t.maps = t.maps[:0]
		t.head = 0
	}
	t.last = max(t.last, t.head)
}

// Unacked returns the DSN ranges written to this subflow and not yet
// acknowledged at the subflow level, in subflow order: what to reinject
// elsewhere when this subflow fails. Adjacent ranges are not merged.
func (t *txMappings) Unacked() []span {
	live := t.maps[t.head:]
	if len(live) == 0 {
		return nil
	}
	out := make([]span, 0, len(live))
	for _, m := range live {
		s := span{DSN: m.DSN, Len: m.Len}
		if ssnLT(m.SSN, t.acked) {
			skip := int(t.acked - m.SSN)
			s.DSN += uint64(skip)
			s.Len -= skip
		}
		out = append(out, s)
	}
	return out
}
