package convert

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/mptcpep/mpkey"
)

func TestRequestRoundTrip(t *testing.T) {
	psk := bytes.Repeat([]byte{7}, 32)
	tag := AuthTag(psk, 0x0102030405060708, 0x1112131415161718)
	tests := []struct {
		name string
		req  Request
		len  int
	}{
		{"tcp v4", Request{HasAuth: true, Auth: tag, Kind: KindTCP, Dest: netip.MustParseAddrPort("192.0.2.1:443")}, 44},
		{"tcp v6", Request{HasAuth: true, Auth: tag, Kind: KindTCP, Dest: netip.MustParseAddrPort("[2001:db8::1]:80")}, 44},
		{"udp v4", Request{HasAuth: true, Auth: tag, Kind: KindUDP, Dest: netip.MustParseAddrPort("198.51.100.7:53")}, 44},
		{"no auth", Request{Kind: KindTCP, Dest: netip.MustParseAddrPort("192.0.2.1:1")}, 24},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			require.NoError(t, WriteRequest(&b, tt.req))
			require.Equal(t, tt.len, b.Len())
			require.Equal(t, byte(Version), b.Bytes()[0])
			require.Equal(t, byte(tt.len/4), b.Bytes()[1])
			b.WriteString("payload")
			got, err := ReadRequest(&b)
			require.NoError(t, err)
			require.Equal(t, tt.req, got)
			// ReadRequest must not consume the stream after the message.
			require.Equal(t, "payload", b.String())
		})
	}
}

func TestRequestWireLayout(t *testing.T) {
	// The exact bytes the client and the concentrator agree on.
	var tag [TagLen]byte
	for i := range tag {
		tag[i] = byte(0xA0 + i)
	}
	var b bytes.Buffer
	require.NoError(t, WriteRequest(&b, Request{HasAuth: true, Auth: tag, Kind: KindTCP, Dest: netip.MustParseAddrPort("10.1.2.3:8080")}))
	want := []byte{
		1, 11, 0, 0, // header: version 1, 11 words
		0xF0, 5, 0, 0, // Auth TLV, 5 words, 2 reserved bytes
	}
	want = append(want, tag[:]...)
	want = append(want, 10, 5, 0x1F, 0x90) // Connect TLV, port 8080
	want = append(want, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3)
	require.Equal(t, want, b.Bytes())
}

func TestAuthTag(t *testing.T) {
	psk := []byte("0123456789abcdef0123456789abcdef")
	a := AuthTag(psk, 1, 2)
	require.Equal(t, a, AuthTag(psk, 1, 2))
	require.NotEqual(t, a, AuthTag(psk, 2, 1), "keys are ordered")
	require.NotEqual(t, a, AuthTag(psk, 1, 3))
	require.NotEqual(t, a, AuthTag([]byte("other"), 1, 2))
	req := Request{HasAuth: true, Auth: a}
	require.True(t, req.Verify(psk, 1, 2))
	require.False(t, req.Verify(psk, 1, 3))
	require.False(t, req.Verify(psk[1:], 1, 2))
	req.HasAuth = false
	require.False(t, req.Verify(psk, 1, 2), "a missing tag never verifies")
	var zero [TagLen]byte
	require.False(t, (&Request{HasAuth: true, Auth: zero}).Verify(psk, 0, 0))
	_ = mpkey.Key(0)
}

func TestReadRequestErrors(t *testing.T) {
	auth := append([]byte{0xF0, 5, 0, 0}, make([]byte, 16)...)
	conn := append([]byte{10, 5, 0, 80}, make([]byte, 16)...)
	msg := func(tlvs ...[]byte) []byte {
		b := []byte{1, 0, 0, 0}
		for _, t := range tlvs {
			b = append(b, t...)
		}
		b[1] = byte(len(b) / 4)
		return b
	}
	tests := []struct {
		name string
		in   []byte
		code ErrorCode // 0: not a ConvertError (I/O)
	}{
		{"empty", nil, 0},
		{"short header", []byte{1, 1}, 0},
		{"version 2", []byte{2, 1, 0, 0}, ErrUnsupported},
		{"total length 0", []byte{1, 0, 0, 0}, ErrMalformed},
		{"truncated body", []byte{1, 5, 0, 0, 10, 5}, 0},
		{"no destination", msg(auth), ErrMalformed},
		{"TLV length 0", msg([]byte{10, 0, 0, 0}), ErrMalformed},
		{"TLV too long", msg([]byte{10, 2, 0, 0}), ErrMalformed},
		{"short connect", msg(auth, []byte{10, 1, 0, 80}), ErrMalformed},
		{"two destinations", msg(auth, conn, conn), ErrMalformed},
		{"two auth", msg(auth, auth, conn), ErrMalformed},
		{"bad auth length", msg([]byte{0xF0, 1, 0, 0}, conn), ErrMalformed},
		{"unknown TLV", msg(auth, conn, []byte{99, 1, 0, 0}), ErrUnsupported},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ReadRequest(bytes.NewReader(tt.in))
			require.Error(t, err)
			var ce *ConvertError
			if tt.code == 0 {
				require.False(t, errors.As(err, &ce), "%v", err)
				return
			}
			require.ErrorAs(t, err, &ce)
			require.Equal(t, tt.code, ce.Code)
		})
	}
}

func TestConnectWithTCPOptionsAccepted(t *testing.T) {
	// RFC 8803 lets a Connect TLV carry TCP options after the address.
	b := []byte{1, 8, 0, 0, 10, 7, 0, 80}
	b = append(b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 9)
	b = append(b, 1, 1, 1, 1, 1, 1, 1, 1) // NOPs
	req, err := ReadRequest(bytes.NewReader(b))
	require.NoError(t, err)
	require.Equal(t, netip.MustParseAddrPort("192.0.2.9:80"), req.Dest)
	require.False(t, req.HasAuth)
}

func TestReply(t *testing.T) {
	tests := []struct {
		name string
		code ErrorCode
		wire []byte
	}{
		{"ok", 0, []byte{1, 1, 0, 0}},
		{"not authorized", ErrNotAuthorized, []byte{1, 2, 0, 0, 30, 1, 32, 0}},
		{"unreachable", ErrDestinationUnreachable, []byte{1, 2, 0, 0, 30, 1, 122, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			require.NoError(t, WriteReply(&b, tt.code))
			require.Equal(t, tt.wire, b.Bytes())
			b.WriteString("x")
			err := ReadReply(&b)
			if tt.code == 0 {
				require.NoError(t, err)
			} else {
				var ce *ConvertError
				require.ErrorAs(t, err, &ce)
				require.Equal(t, tt.code, ce.Code)
				require.Contains(t, err.Error(), tt.code.String())
			}
			require.Equal(t, "x", b.String())
		})
	}
	// A closed stream is an I/O error, not a Convert error.
	err := ReadReply(bytes.NewReader(nil))
	require.ErrorIs(t, err, io.EOF)
}

func TestDatagrams(t *testing.T) {
	var b bytes.Buffer
	payloads := [][]byte{{}, []byte("dns query"), bytes.Repeat([]byte{0x5a}, MaxDatagram)}
	for _, p := range payloads {
		require.NoError(t, WriteDatagram(&b, p))
	}
	require.Error(t, WriteDatagram(&b, make([]byte, MaxDatagram+1)))
	buf := make([]byte, MaxDatagram)
	for _, p := range payloads {
		n, err := ReadDatagram(&b, buf)
		require.NoError(t, err)
		require.Equal(t, p, buf[:n])
	}
	_, err := ReadDatagram(&b, buf)
	require.ErrorIs(t, err, io.EOF)

	// Too large for the buffer: skipped, the next one still reads.
	b.Reset()
	require.NoError(t, WriteDatagram(&b, []byte("0123456789")))
	require.NoError(t, WriteDatagram(&b, []byte("ok")))
	_, err = ReadDatagram(&b, make([]byte, 4))
	require.ErrorIs(t, err, io.ErrShortBuffer)
	n, err := ReadDatagram(&b, buf)
	require.NoError(t, err)
	require.Equal(t, "ok", string(buf[:n]))

	// Truncated inside a datagram.
	_, err = ReadDatagram(bytes.NewReader([]byte{0, 5, 'a'}), buf)
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
}

func TestMessageAppendLimits(t *testing.T) {
	_, err := Message{TLVs: []TLV{{Type: 1, Value: []byte{1}}}}.Append(nil)
	require.Error(t, err, "TLV not a multiple of 4")
	big := Message{TLVs: []TLV{{Type: 1, Value: make([]byte, MaxMessageLen)}}}
	_, err = big.Append(nil)
	require.Error(t, err)
	_, err = (&Request{Kind: KindTCP}).Message()
	require.Error(t, err, "no destination")
	_, err = (&Request{Dest: netip.MustParseAddrPort("1.2.3.4:5")}).Message()
	require.Error(t, err, "no kind")
}

func BenchmarkReadRequest(b *testing.B) {
	var buf bytes.Buffer
	require.NoError(b, WriteRequest(&buf, Request{HasAuth: true, Kind: KindTCP, Dest: netip.MustParseAddrPort("192.0.2.1:443")}))
	wire := buf.Bytes()
	r := bytes.NewReader(wire)
	b.ReportAllocs()
	for b.Loop() {
		r.Reset(wire)
		if _, err := ReadRequest(r); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAuthTag(b *testing.B) {
	psk := make([]byte, 32)
	b.ReportAllocs()
	for b.Loop() {
		AuthTag(psk, 1, 2)
	}
}

func BenchmarkDatagram(b *testing.B) {
	p := make([]byte, 1200)
	out := make([]byte, MaxDatagram)
	var buf bytes.Buffer
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	for b.Loop() {
		buf.Reset()
		if err := WriteDatagram(&buf, p); err != nil {
			b.Fatal(err)
		}
		if _, err := ReadDatagram(&buf, out); err != nil {
			b.Fatal(err)
		}
	}
}
