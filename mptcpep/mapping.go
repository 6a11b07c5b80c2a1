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

// mappingIndex is what the receive and send mapping tables of a subflow
// share: mappings ordered by SSN and disjoint, the front of which is
// dropped once the subflow has consumed (rx) or had acknowledged (tx)
// their bytes. Lookups are in subflow order nearly always, so the last
// hit and the one after it are tried before a binary search.
//
// SSNs are compared wrap-safely; the tables keep every SSN they hold
// within 2^31 of their front. Not safe for concurrent use: the caller
// holds the connection lock.
type mappingIndex[M ssnMapping] struct {
	maps []M // sorted by SSN, disjoint; maps[head:] are live
	head int
	last int // index of the last Find hit
}

// ssnMapping is a mapping of subflow bytes [SSN, SSN+Len) to DSNs
// [DSN, DSN+Len): rxMapping or txMapping.
type ssnMapping interface {
	rxMapping | txMapping
	place() (ssn uint32, dsn uint64, n int)
	end() uint32
}

// Len returns the number of mappings held.
func (x *mappingIndex[M]) Len() int { return len(x.maps) - x.head }

// live returns the mappings held, in SSN order.
func (x *mappingIndex[M]) live() []M { return x.maps[x.head:] }

// Find returns the mapping covering subflow byte ssn.
func (x *mappingIndex[M]) Find(ssn uint32) (M, bool) {
	if k, ok := x.index(ssn); ok {
		return x.maps[k], true
	}
	var zero M
	return zero, false
}

// index returns the index in maps of the mapping covering ssn.
func (x *mappingIndex[M]) index(ssn uint32) (int, bool) {
	for _, k := range [2]int{x.last, x.last + 1} {
		if k >= x.head && k < len(x.maps) && coversMapping(x.maps[k], ssn) {
			x.last = k
			return k, true
		}
	}
	live := x.live()
	k := sort.Search(len(live), func(k int) bool { return ssnLT(ssn, live[k].end()) })
	if k < len(live) && coversMapping(live[k], ssn) {
		x.last = x.head + k
		return x.last, true
	}
	return 0, false
}

// Lookup returns the DSN of subflow byte ssn and how many bytes from ssn
// on share its mapping.
func (x *mappingIndex[M]) Lookup(ssn uint32) (dsn uint64, n int, ok bool) {
	k, ok := x.index(ssn)
	if !ok {
		return 0, 0, false
	}
	mssn, mdsn, mlen := x.maps[k].place()
	off := ssn - mssn
	return mdsn + uint64(off), mlen - int(off), true
}

// dropBelow drops the mappings whose bytes all lie below upTo.
func (x *mappingIndex[M]) dropBelow(upTo uint32) {
	var zero M
	for x.head < len(x.maps) && ssnLEQ(x.maps[x.head].end(), upTo) {
		x.maps[x.head] = zero
		x.head++
	}
	if x.head == len(x.maps) {
		x.maps = x.maps[:0]
		x.head = 0
	}
	x.last = max(x.last, x.head)
}

// compact moves the live mappings to the front of the array when it is
// full, instead of growing it, and returns by how much indexes moved.
func (x *mappingIndex[M]) compact() int {
	if x.head == 0 || len(x.maps) < cap(x.maps) {
		return 0
	}
	shift := x.head
	n := copy(x.maps, x.maps[x.head:])
	x.maps = x.maps[:n]
	x.last = max(x.last-shift, 0)
	x.head = 0
	return shift
}

// coversMapping reports whether m maps subflow byte ssn.
func coversMapping[M ssnMapping](m M, ssn uint32) bool {
	mssn, _, n := m.place()
	return covers(mssn, n, ssn)
}

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

func (m rxMapping) place() (uint32, uint64, int) { return m.SSN, m.DSN, m.Len }

// sameMap reports whether m and o place their common bytes at the same
// DSNs.
func (m rxMapping) sameMap(o rxMapping) bool {
	if ssnLEQ(o.SSN, m.SSN) {
		return o.DSN+uint64(m.SSN-o.SSN) == m.DSN
	}
	return m.DSN+uint64(o.SSN-m.SSN) == o.DSN
}

// rxMappings is one subflow's table of received DSS mappings, from which
// the connection learns the DSN of every subflow byte it reads (Find,
// Lookup). Bytes are consumed in subflow order; mappings entirely below
// the consumed offset are dropped.
type rxMappings struct {
	mappingIndex[rxMapping]
	consumed uint32 // every byte below this SSN was read
}

// newRxMappings returns a table whose next byte to consume is at SSN
// first (1 for the first data byte after the handshake).
func newRxMappings(first uint32) *rxMappings {
	return &rxMappings{consumed: first}
}

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
	live := t.live()
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
	i -= t.compact()
	t.maps = append(t.maps, rxMapping{})
	copy(t.maps[i+1:], t.maps[i:])
	t.maps[i] = m
	return nil
}

// Consume records that the subflow bytes below upTo were read and drops
// the mappings entirely below it.
func (t *rxMappings) Consume(upTo uint32) {
	if ssnLEQ(upTo, t.consumed) {
		return
	}
	t.consumed = upTo
	t.dropBelow(upTo)
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

func (m txMapping) place() (uint32, uint64, int) { return m.SSN, m.DSN, m.Len }

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
	mappingIndex[txMapping]
	next  uint32 // SSN following the last byte added
	acked uint32 // subflow-level ACK: bytes below are acknowledged
}

// newTxMappings returns a table whose first data byte is at SSN first.
func newTxMappings(first uint32) *txMappings {
	return &txMappings{next: first, acked: first}
}

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
		t.compact()
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
	if k, ok := t.index(ssn); ok {
		t.maps[k].sealed = true
	}
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
	t.dropBelow(ssn)
}

// Unacked returns the DSN ranges written to this subflow and not yet
// acknowledged at the subflow level, in subflow order: what to reinject
// elsewhere when this subflow fails. Adjacent ranges are not merged.
func (t *txMappings) Unacked() []span {
	live := t.live()
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
