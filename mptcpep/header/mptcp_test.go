package header

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// allVariants is one option of every encoding length variant.
func allVariants() []Option {
	v4 := netip.MustParseAddr("192.0.2.7")
	v6 := netip.MustParseAddr("2001:db8::42")
	return []Option{
		MPCapable{Version: 1, HMACSHA256: true, ChecksumRequired: true, Flags: 0x81},
		MPCapable{Version: 1, HMACSHA256: true, NoMoreSubflows: true, Flags: 0x21, SenderKey: 0x0102030405060708, NumKeys: 1},
		MPCapable{Version: 1, HMACSHA256: true, Flags: 0x01, SenderKey: 1, ReceiverKey: ^uint64(0), NumKeys: 2},
		MPCapable{Version: 1, HMACSHA256: true, Flags: 0x01, SenderKey: 1, ReceiverKey: 2, NumKeys: 2, HasDataLen: true, DataLen: 1400},
		MPCapable{Version: 1, HMACSHA256: true, ChecksumRequired: true, Flags: 0x81, SenderKey: 1, ReceiverKey: 2, NumKeys: 2, HasDataLen: true, DataLen: 9, HasChecksum: true, Checksum: 0xbeef},
		MPJoinSYN{Backup: true, AddrID: 3, Token: 0xdeadbeef, Nonce: 0x01020304},
		MPJoinSYNACK{AddrID: 255, HMAC: 0x1122334455667788, Nonce: 9},
		MPJoinACK{HMAC: [20]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20}},
		DSS{},
		DSS{HasDataAck: true, DataAck: 0xfffffffe},
		DSS{HasDataAck: true, DataAck64: true, DataAck: 1 << 40},
		DSS{HasMapping: true, DSN: 7, SSN: 1, DataLen: 100},
		DSS{HasMapping: true, DSN64: true, DSN: 1 << 50, SSN: 1, DataLen: 100, HasChecksum: true, Checksum: 0x1234},
		DSS{HasDataAck: true, DataAck64: true, DataAck: 5, HasMapping: true, DSN64: true, DSN: 6, SSN: 7, DataLen: 8, HasChecksum: true, Checksum: 9, DataFin: true},
		DSS{HasDataAck: true, DataAck: 5, HasMapping: true, DSN: 6, SSN: 7, DataLen: 1, DataFin: true},
		DSS{HasDataAck: true, DataAck64: true, DataAck: 5, HasMapping: true, DSN64: true, DSN: 6, SSN: 7, DataLen: 8},
		DSS{DataFin: true},
		AddAddr{AddrID: 1, Addr: v4, HMAC: 0xa1a2a3a4a5a6a7a8},
		AddAddr{AddrID: 1, Addr: v4, Port: 8080, HMAC: 1},
		AddAddr{Echo: true, AddrID: 2, Addr: v4},
		AddAddr{Echo: true, AddrID: 2, Addr: v4, Port: 1},
		AddAddr{AddrID: 3, Addr: v6, HMAC: 2},
		AddAddr{AddrID: 3, Addr: v6, Port: 443, HMAC: 3},
		AddAddr{Echo: true, AddrID: 4, Addr: v6},
		AddAddr{Echo: true, AddrID: 4, Addr: v6, Port: 65535},
		RemoveAddr{AddrIDs: []uint8{1}},
		RemoveAddr{AddrIDs: []uint8{1, 2, 3, 200}},
		MPPrio{Backup: true},
		MPPrio{},
		MPFail{DSN: 0x0102030405060708},
		MPFastclose{ReceiverKey: 42},
		MPTCPRst{Transient: true, Reason: RstReasonMiddlebox},
		MPTCPRst{Reason: RstReasonUnspecified},
	}
}

func TestRoundTrip(t *testing.T) {
	wantLens := map[int]bool{}
	for _, o := range allVariants() {
		t.Run(o.Subtype().String(), func(t *testing.T) {
			b := make([]byte, 40)
			n := o.Encode(b)
			require.Equal(t, o.Len(), n)
			require.Equal(t, byte(n), b[1])
			wantLens[n] = true
			// A buffer one byte short must be refused untouched.
			short := make([]byte, n-1)
			require.Zero(t, o.Encode(short))
			require.Equal(t, make([]byte, n-1), short)

			got, err := Parse(b[:n])
			require.NoError(t, err)
			require.Equal(t, o, got)
			// Trailing bytes after the option's length are ignored.
			got, err = Parse(b)
			require.NoError(t, err)
			require.Equal(t, o, got)
		})
	}
	for _, l := range []int{3, 4, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30} {
		require.True(t, wantLens[l], "length %d not covered", l)
	}
}

func TestEncodeBytes(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Option
		want []byte
	}{
		{"MP_CAPABLE SYN", MPCapable{Version: 1, ChecksumRequired: true, HMACSHA256: true}, []byte{30, 4, 0x01, 0x81}},
		{"MP_CAPABLE SYN/ACK", MPCapable{Version: 1, HMACSHA256: true, NumKeys: 1, SenderKey: 0x0102030405060708},
			[]byte{30, 12, 0x01, 0x01, 1, 2, 3, 4, 5, 6, 7, 8}},
		{"MP_CAPABLE B never sent", MPCapable{Version: 1, Flags: 0x40 | 0x02}, []byte{30, 4, 0x01, 0x02}},
		{"MP_JOIN SYN", MPJoinSYN{Backup: true, AddrID: 5, Token: 0xa0b0c0d0, Nonce: 0x01020304},
			[]byte{30, 12, 0x11, 5, 0xa0, 0xb0, 0xc0, 0xd0, 1, 2, 3, 4}},
		{"DSS ack32 + map64 + csum", DSS{HasDataAck: true, DataAck: 0x11223344, HasMapping: true, DSN64: true, DSN: 0x0102030405060708, SSN: 0xaabbccdd, DataLen: 0x0506, HasChecksum: true, Checksum: 0xfeed, DataFin: true},
			[]byte{30, 24, 0x20, 0x1d, 0x11, 0x22, 0x33, 0x44, 1, 2, 3, 4, 5, 6, 7, 8, 0xaa, 0xbb, 0xcc, 0xdd, 5, 6, 0xfe, 0xed}},
		{"ADD_ADDR v4 port", AddAddr{AddrID: 9, Addr: netip.MustParseAddr("10.1.2.3"), Port: 0x1f90, HMAC: 0x0102030405060708},
			[]byte{30, 18, 0x30, 9, 10, 1, 2, 3, 0x1f, 0x90, 1, 2, 3, 4, 5, 6, 7, 8}},
		{"ADD_ADDR echo", AddAddr{Echo: true, AddrID: 9, Addr: netip.MustParseAddr("10.1.2.3")}, []byte{30, 8, 0x31, 9, 10, 1, 2, 3}},
		{"REMOVE_ADDR", RemoveAddr{AddrIDs: []uint8{4, 5}}, []byte{30, 5, 0x40, 4, 5}},
		{"MP_PRIO", MPPrio{Backup: true}, []byte{30, 3, 0x51}},
		{"MP_FAIL", MPFail{DSN: 0x0102030405060708}, []byte{30, 12, 0x60, 0, 1, 2, 3, 4, 5, 6, 7, 8}},
		{"MP_FASTCLOSE", MPFastclose{ReceiverKey: 0x0102030405060708}, []byte{30, 12, 0x70, 0, 1, 2, 3, 4, 5, 6, 7, 8}},
		{"MP_TCPRST", MPTCPRst{Transient: true, Reason: RstReasonLackOfResources}, []byte{30, 4, 0x81, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := make([]byte, 40)
			n := tc.o.Encode(b)
			require.Equal(t, tc.want, b[:n])
		})
	}
}

func TestParseRejects(t *testing.T) {
	v4Add := make([]byte, 40)
	v4Add = v4Add[:AddAddr{AddrID: 1, Addr: netip.MustParseAddr("192.0.2.1"), HMAC: 1}.Encode(v4Add)]
	for _, tc := range []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrTruncated},
		{"kind only", []byte{30}, ErrTruncated},
		{"not mptcp", []byte{8, 10, 0, 0, 0, 0, 0, 0, 0, 0}, ErrNotMPTCP},
		{"length 2", []byte{30, 2, 0}, ErrBadLength},
		{"length past buffer", []byte{30, 12, 0x01, 0x01}, ErrTruncated},
		{"MP_CAPABLE v0", []byte{30, 12, 0x00, 0x81, 1, 2, 3, 4, 5, 6, 7, 8}, ErrBadVersion},
		{"MP_CAPABLE v0 SYN", []byte{30, 4, 0x00, 0x81}, ErrBadVersion},
		{"MP_CAPABLE v2 SYN/ACK", []byte{30, 12, 0x02, 0x01, 1, 2, 3, 4, 5, 6, 7, 8}, ErrBadVersion},
		{"MP_CAPABLE B flag", []byte{30, 4, 0x01, 0x41}, ErrBadFlags},
		{"MP_CAPABLE length 8", []byte{30, 8, 0x01, 0x01, 0, 0, 0, 0}, ErrBadLength},
		{"MP_CAPABLE length 21", append([]byte{30, 21, 0x01, 0x01}, make([]byte, 17)...), ErrBadLength},
		{"MP_JOIN length 13", append([]byte{30, 13, 0x10, 0x01}, make([]byte, 9)...), ErrBadLength},
		{"MP_JOIN truncated", []byte{30, 24, 0x10, 0, 1, 2}, ErrTruncated},
		{"DSS length vs flags", []byte{30, 8, 0x20, 0x05, 0, 0, 0, 0}, ErrBadLength},
		{"DSS csum without mapping", []byte{30, 10, 0x20, 0x01, 0, 0, 0, 0, 0, 0}, ErrBadLength},
		{"DSS short ack64", []byte{30, 8, 0x20, 0x03, 0, 0, 0, 0}, ErrBadLength},
		{"ADD_ADDR length 9", []byte{30, 9, 0x31, 1, 1, 2, 3, 4, 0}, ErrBadLength},
		{"ADD_ADDR HMAC missing", []byte{30, 10, 0x30, 1, 1, 2, 3, 4, 0, 0}, ErrBadLength},
		{"ADD_ADDR port 0", []byte{30, 10, 0x31, 1, 1, 2, 3, 4, 0, 0}, ErrBadLength},
		{"ADD_ADDR truncated", v4Add[:len(v4Add)-1], ErrTruncated},
		{"REMOVE_ADDR empty", []byte{30, 3, 0x40}, ErrBadLength},
		{"MP_PRIO v0 length 4", []byte{30, 4, 0x51, 1}, ErrBadLength},
		{"MP_FAIL length 11", append([]byte{30, 11, 0x60}, make([]byte, 8)...), ErrBadLength},
		{"MP_FASTCLOSE length 13", append([]byte{30, 13, 0x70}, make([]byte, 10)...), ErrBadLength},
		{"MP_TCPRST length 3", []byte{30, 3, 0x80}, ErrBadLength},
		{"subtype 9", []byte{30, 4, 0x90, 0}, ErrUnknownSubtype},
		{"experimental", []byte{30, 4, 0xf0, 0}, ErrUnknownSubtype},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := Parse(tc.b)
			require.Nil(t, o)
			require.ErrorIs(t, err, tc.want)
		})
	}
	// Every strict prefix of every valid option is rejected, never panics.
	for _, o := range allVariants() {
		b := make([]byte, o.Len())
		o.Encode(b)
		for i := range b {
			_, err := Parse(b[:i])
			require.Error(t, err, "%v prefix %d", o.Subtype(), i)
		}
	}
}

func TestMPCapableFutureVersionSYN(t *testing.T) {
	// Linux answers a SYN with a higher version with its own v1.
	o, err := Parse([]byte{30, 4, 0x03, 0x01})
	require.NoError(t, err)
	require.Equal(t, uint8(3), o.(MPCapable).Version)
}

func TestWalkTCPOptions(t *testing.T) {
	mss := []byte{2, 4, 0x05, 0xb4}
	ts := []byte{8, 10, 0, 0, 0, 1, 0, 0, 0, 2}
	dss := []byte{30, 8, 0x20, 0x01, 0, 0, 0, 9}
	type seen struct {
		kind uint8
		raw  []byte
	}
	for _, tc := range []struct {
		name    string
		opts    []byte
		want    []seen
		wantErr error
	}{
		{"empty", nil, nil, nil},
		{"nops and eol", []byte{1, 1, 0, 30, 99}, nil, nil},
		{"mixed", concat(mss, []byte{1, 1}, ts, dss), []seen{{2, mss}, {8, ts}, {30, dss}}, nil},
		{"stops at eol", concat(mss, []byte{0}, dss), []seen{{2, mss}}, nil},
		{"no length byte", []byte{1, 2}, nil, ErrMalformedOptions},
		{"length 1", []byte{2, 1, 0, 0}, nil, ErrMalformedOptions},
		{"length past end", concat(mss, []byte{8, 10, 0}), []seen{{2, mss}}, ErrMalformedOptions},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []seen
			err := WalkTCPOptions(tc.opts, func(kind uint8, raw []byte) error {
				got = append(got, seen{kind, raw})
				return nil
			})
			require.ErrorIs(t, err, tc.wantErr)
			if tc.wantErr == nil {
				require.NoError(t, err)
			}
			require.Equal(t, tc.want, got)
		})
	}
	stop := errors.New("stop")
	calls := 0
	err := WalkTCPOptions(concat(mss, ts), func(uint8, []byte) error { calls++; return stop })
	require.Equal(t, stop, err)
	require.Equal(t, 1, calls)
}

func TestParseMPTCPKeepsGoodOptions(t *testing.T) {
	good := []byte{30, 3, 0x51}
	bad := []byte{30, 4, 0x90, 0}
	dss := []byte{30, 8, 0x20, 0x01, 0, 0, 0, 9}
	opts, err := ParseMPTCP(concat([]byte{2, 4, 5, 0xb4}, good, bad, []byte{1}, dss))
	require.ErrorIs(t, err, ErrUnknownSubtype)
	require.Equal(t, []Option{MPPrio{Backup: true}, DSS{HasDataAck: true, DataAck: 9}}, opts)

	// A broken block layout is reported too, after what could be read.
	opts, err = ParseMPTCP(concat(good, []byte{8, 30}))
	require.ErrorIs(t, err, ErrMalformedOptions)
	require.Equal(t, []Option{MPPrio{Backup: true}}, opts)
}

func TestDSSChecksum(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 2, 3, 1399, 1400} {
		payload := make([]byte, n)
		for i := range payload {
			payload[i] = byte(rng.Uint32())
		}
		dsn, ssn := rng.Uint64(), rng.Uint32()
		c := DSSChecksum(dsn, ssn, uint16(n), checksum.Checksum(payload, 0))
		// The receiver's check: summing the pseudo-header with the checksum
		// in place, then the payload, gives all ones.
		ph := make([]byte, 16)
		binary.BigEndian.PutUint64(ph, dsn)
		binary.BigEndian.PutUint32(ph[8:], ssn)
		binary.BigEndian.PutUint16(ph[12:], uint16(n))
		binary.BigEndian.PutUint16(ph[14:], c)
		require.Equal(t, uint16(0xffff), checksum.Checksum(payload, checksum.Checksum(ph, 0)), "len %d", n)
		require.Equal(t, DSSChecksum(dsn+1, 1, uint16(n), checksum.Checksum(payload, 0)), MPCapableChecksum(dsn, uint16(n), checksum.Checksum(payload, 0)))
	}
}

func TestSubtypeString(t *testing.T) {
	require.Equal(t, "DSS", SubtypeDSS.String())
	require.Equal(t, "MP_TCPRST", SubtypeMPTCPRst.String())
	require.Equal(t, "MPTCP_SUBTYPE_15", SubtypeMPExperimental.String())
}

func TestDecodeDoesNotAllocate(t *testing.T) {
	b := make([]byte, 40)
	n := DSS{HasDataAck: true, DataAck64: true, DataAck: 1, HasMapping: true, DSN64: true, DSN: 2, SSN: 3, DataLen: 4, HasChecksum: true}.Encode(b)
	opts := concat([]byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}, b[:n])
	var d DSS
	allocs := testing.AllocsPerRun(100, func() {
		_ = WalkTCPOptions(opts, func(kind uint8, raw []byte) error {
			if st, ok := SubtypeOf(raw); ok && st == SubtypeDSS {
				return d.Decode(raw)
			}
			return nil
		})
		d.Encode(b)
	})
	require.Zero(t, allocs)
	require.Equal(t, uint64(2), d.DSN)
}

func concat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func BenchmarkDSSEncode(b *testing.B) {
	d := DSS{HasDataAck: true, DataAck64: true, DataAck: 1 << 40, HasMapping: true, DSN64: true, DSN: 1 << 41, SSN: 1, DataLen: 1400, HasChecksum: true, Checksum: 7}
	buf := make([]byte, 40)
	for b.Loop() {
		d.Encode(buf)
	}
}

func BenchmarkDSSDecode(b *testing.B) {
	buf := make([]byte, 40)
	n := DSS{HasDataAck: true, DataAck64: true, DataAck: 1 << 40, HasMapping: true, DSN64: true, DSN: 1 << 41, SSN: 1, DataLen: 1400}.Encode(buf)
	var d DSS
	for b.Loop() {
		if err := d.Decode(buf[:n]); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseDSS(b *testing.B) {
	buf := make([]byte, 40)
	n := DSS{HasDataAck: true, DataAck64: true, DataAck: 1 << 40, HasMapping: true, DSN64: true, DSN: 1 << 41, SSN: 1, DataLen: 1400}.Encode(buf)
	for b.Loop() {
		if _, err := Parse(buf[:n]); err != nil {
			b.Fatal(err)
		}
	}
}
