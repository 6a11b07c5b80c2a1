package mpkey

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/internal/kernelvectors"
	"github.com/mptun/mptun/mptcpep/header"
)

// onesSum is the ones' complement sum of b (RFC 1071), as the DSS checksum
// takes its payload part; here so that the test needs no gVisor.
func onesSum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// kernelVectors are values captured on the wire between two Linux MPTCP
// endpoints (integration/kernelcapture_test.go regenerates the file with
// MTC_WRITE_KERNEL_VECTORS=<path>).
type kernelVectors = kernelvectors.Vectors

func loadKernelVectors(t *testing.T) kernelVectors {
	t.Helper()
	b, err := os.ReadFile("testdata/kernel-vectors.json")
	require.NoError(t, err)
	var v kernelVectors
	require.NoError(t, json.Unmarshal(b, &v))
	require.NotZero(t, v.ClientKey)
	require.NotZero(t, v.ServerKey)
	return v
}

func TestKernelVectors(t *testing.T) {
	v := loadKernelVectors(t)
	client, server := Key(v.ClientKey), Key(v.ServerKey)
	ackHMAC, err := hex.DecodeString(v.Join.ACKHMAC)
	require.NoError(t, err)
	dssPayload, err := hex.DecodeString(v.DSSChecksum.Payload)
	require.NoError(t, err)
	mpcPayload, err := hex.DecodeString(v.MPCapableChecksum.Payload)
	require.NoError(t, err)

	tests := []struct {
		name      string
		got, want any
	}{
		{"token of server key in MP_JOIN SYN", server.Token(), v.ServerToken},
		{"client IDSN+1 is its first DSN", client.IDSN() + 1, v.ClientFirstDSN},
		{"server IDSN+1 is its first DSN", server.IDSN() + 1, v.ServerFirstDSN},
		{"MP_JOIN SYN/ACK truncated HMAC", JoinSYNACKHMAC(server, client, v.Join.ServerNonce, v.Join.ClientNonce), v.Join.SYNACKHMAC},
		{"MP_JOIN ACK HMAC", JoinACKHMAC(client, server, v.Join.ClientNonce, v.Join.ServerNonce), [20]byte(ackHMAC)},
		{"ADD_ADDR HMAC", AddAddrHMAC(server, client, v.AddAddr.ID, netip.MustParseAddr(v.AddAddr.Addr), v.AddAddr.Port), v.AddAddr.HMAC},
		{"DSS checksum", header.DSSChecksum(v.DSSChecksum.DSN, v.DSSChecksum.SSN, v.DSSChecksum.DataLen, onesSum(dssPayload)), v.DSSChecksum.Checksum},
		{"MP_CAPABLE data checksum", header.MPCapableChecksum(Key(v.MPCapableChecksum.ClientKey).IDSN(), v.MPCapableChecksum.DataLen, onesSum(mpcPayload)), v.MPCapableChecksum.Checksum},
		// Swapping roles must not match: guards against a symmetric bug.
		{"swapped keys differ", JoinSYNACKHMAC(client, server, v.Join.ServerNonce, v.Join.ClientNonce) != v.Join.SYNACKHMAC, true},
		{"swapped ADD_ADDR keys differ", AddAddrHMAC(client, server, v.AddAddr.ID, netip.MustParseAddr(v.AddAddr.Addr), v.AddAddr.Port) != v.AddAddr.HMAC, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, tc.got)
		})
	}
}

// TestDerivationsMatchDefinition recomputes every derivation from the
// standard library primitives, byte by byte, for a few keys.
func TestDerivationsMatchDefinition(t *testing.T) {
	for _, k := range []Key{1, 0x0123456789abcdef, 0xffffffffffffffff} {
		var kb [8]byte
		binary.BigEndian.PutUint64(kb[:], uint64(k))
		sum := sha256.Sum256(kb[:])
		require.Equal(t, binary.BigEndian.Uint32(sum[:4]), k.Token())
		require.Equal(t, binary.BigEndian.Uint64(sum[24:]), k.IDSN())
		tok, idsn := k.TokenIDSN()
		require.Equal(t, k.Token(), tok)
		require.Equal(t, k.IDSN(), idsn)
	}
	a, b := Key(0x1111111122222222), Key(0x3333333344444444)
	m := hmac.New(sha256.New, []byte{0x11, 0x11, 0x11, 0x11, 0x22, 0x22, 0x22, 0x22, 0x33, 0x33, 0x33, 0x33, 0x44, 0x44, 0x44, 0x44})
	m.Write([]byte{0xaa, 0xbb, 0xcc, 0xdd, 0x01, 0x02, 0x03, 0x04})
	want := m.Sum(nil)
	require.Equal(t, want, func() []byte { h := HMAC(a, b, []byte{0xaa, 0xbb, 0xcc, 0xdd, 1, 2, 3, 4}); return h[:] }())
	require.Equal(t, binary.BigEndian.Uint64(want[:8]), JoinSYNACKHMAC(a, b, 0xaabbccdd, 0x01020304))
	require.Equal(t, [20]byte(want[:20]), JoinACKHMAC(a, b, 0xaabbccdd, 0x01020304))

	// ADD_ADDR: id || addr || port (always 2 bytes), rightmost 64 bits.
	for _, tc := range []struct {
		addr netip.Addr
		port uint16
		msg  []byte
	}{
		{netip.MustParseAddr("192.0.2.1"), 0, []byte{7, 192, 0, 2, 1, 0, 0}},
		{netip.MustParseAddr("192.0.2.1"), 0x1234, []byte{7, 192, 0, 2, 1, 0x12, 0x34}},
		{netip.MustParseAddr("2001:db8::1"), 443, append(append([]byte{7}, netip.MustParseAddr("2001:db8::1").AsSlice()...), 0x01, 0xbb)},
	} {
		h := HMAC(a, b, tc.msg)
		require.Equal(t, binary.BigEndian.Uint64(h[24:]), AddAddrHMAC(a, b, 7, tc.addr, tc.port), "%v port %d", tc.addr, tc.port)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func TestNewKey(t *testing.T) {
	nonZero := bytes.Repeat([]byte{0}, 8)
	nonZero = append(nonZero, 0, 0, 0, 0, 0, 0, 0, 5)
	for _, tc := range []struct {
		name    string
		r       io.Reader
		want    Key
		wantErr error
	}{
		{"random bytes", bytes.NewReader([]byte{1, 2, 3, 4, 5, 6, 7, 8}), 0x0102030405060708, nil},
		{"zero key is skipped", bytes.NewReader(nonZero), 5, nil},
		{"only zeros", zeroReader{}, 0, ErrZeroKey},
		{"short read", bytes.NewReader([]byte{1, 2, 3}), 0, io.ErrUnexpectedEOF},
		{"empty", bytes.NewReader(nil), 0, io.EOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := NewKey(tc.r)
			if tc.wantErr != nil {
				require.True(t, errors.Is(err, tc.wantErr), "got %v", err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, k)
		})
	}
}

func BenchmarkTokenIDSN(b *testing.B) {
	k := Key(0x0123456789abcdef)
	for b.Loop() {
		k.TokenIDSN()
	}
}

func BenchmarkJoinACKHMAC(b *testing.B) {
	for b.Loop() {
		JoinACKHMAC(1, 2, 3, 4)
	}
}
