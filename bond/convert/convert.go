// Package convert is the wire format between the mptun client and the
// concentrator: an RFC 8803 (0-RTT TCP Convert) message at the start of
// every MPTCP connection, carrying a pre-shared-key authenticator bound to
// the connection's MPTCP keys and the destination; the concentrator's reply
// (an empty message, or an Error TLV); and the length-prefixed framing of
// datagrams on a UDP association.
//
// Message layout (RFC 8803 §6.1): a 4-byte fixed header (Version 1, Total
// Length in 32-bit words including the header, 16 unassigned bits) and TLVs
// (Type, Length in 32-bit words including the 2-byte TLV header, Value).
// mptun uses the Connect TLV (10), the Error TLV (30) and two private TLVs:
// Auth (0xF0: 2 zero bytes, then the 16-byte tag) and UDP (0xF1: same layout
// as Connect).
package convert

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Version is the only Convert protocol version (RFC 8803).
const Version = 1

// TLV types.
const (
	TypeConnect uint8 = 10
	TypeError   uint8 = 30
	TypeAuth    uint8 = 0xF0
	TypeUDP     uint8 = 0xF1
)

// MaxMessageLen is the largest message: Total Length is 8 bits of words.
const MaxMessageLen = 255 * 4

// HeaderLen is the size of the fixed header.
const HeaderLen = 4

// ErrorCode is an RFC 8803 §6.2.7 error code.
type ErrorCode uint8

// Error codes used by mptun.
const (
	ErrMalformed              ErrorCode = 1
	ErrUnsupported            ErrorCode = 2
	ErrNotAuthorized          ErrorCode = 32
	ErrResourceExceeded       ErrorCode = 96
	ErrNetworkFailure         ErrorCode = 97
	ErrConnectionReset        ErrorCode = 121
	ErrDestinationUnreachable ErrorCode = 122
	ErrConnectionTimedOut     ErrorCode = 123
)

func (c ErrorCode) String() string {
	switch c {
	case ErrMalformed:
		return "malformed message"
	case ErrUnsupported:
		return "unsupported message"
	case ErrNotAuthorized:
		return "not authorized"
	case ErrResourceExceeded:
		return "resource exceeded"
	case ErrNetworkFailure:
		return "network failure"
	case ErrConnectionReset:
		return "connection reset"
	case ErrDestinationUnreachable:
		return "destination unreachable"
	case ErrConnectionTimedOut:
		return "connection timed out"
	}
	return fmt.Sprintf("error %d", uint8(c))
}

// ConvertError is an Error TLV received from the peer, or a protocol error
// detected locally that should be answered with Code.
type ConvertError struct {
	Code ErrorCode
	// Detail says what was wrong (local errors only; not sent).
	Detail string
}

func (e *ConvertError) Error() string {
	if e.Detail != "" {
		return fmt.Sprintf("convert: %s (%d): %s", e.Code, uint8(e.Code), e.Detail)
	}
	return fmt.Sprintf("convert: %s (%d)", e.Code, uint8(e.Code))
}

func malformed(format string, a ...any) error {
	return &ConvertError{Code: ErrMalformed, Detail: fmt.Sprintf(format, a...)}
}

// TLV is one type-length-value element. Value excludes the 2-byte header;
// its length plus 2 must be a multiple of 4.
type TLV struct {
	Type  uint8
	Value []byte
}

// Message is a decoded Convert message.
type Message struct {
	TLVs []TLV
}

// Len returns the encoded length of m in bytes.
func (m Message) Len() int {
	n := HeaderLen
	for _, t := range m.TLVs {
		n += 2 + len(t.Value)
	}
	return n
}

// Append appends the encoding of m to dst.
func (m Message) Append(dst []byte) ([]byte, error) {
	n := m.Len()
	if n > MaxMessageLen {
		return dst, fmt.Errorf("convert: message of %d bytes exceeds %d", n, MaxMessageLen)
	}
	dst = append(dst, Version, byte(n/4), 0, 0)
	for _, t := range m.TLVs {
		l := 2 + len(t.Value)
		if l%4 != 0 {
			return dst, fmt.Errorf("convert: TLV %d: length %d is not a multiple of 4", t.Type, l)
		}
		dst = append(dst, t.Type, byte(l/4))
		dst = append(dst, t.Value...)
	}
	return dst, nil
}

// Decode parses one complete message. Value slices alias b.
func Decode(b []byte) (Message, error) {
	var m Message
	if len(b) < HeaderLen {
		return m, malformed("message of %d bytes is shorter than the header", len(b))
	}
	if b[0] != Version {
		return m, &ConvertError{Code: ErrUnsupported, Detail: fmt.Sprintf("version %d", b[0])}
	}
	total := int(b[1]) * 4
	if total < HeaderLen || total != len(b) {
		return m, malformed("total length %d words does not match %d bytes", b[1], len(b))
	}
	rest := b[HeaderLen:]
	for len(rest) > 0 {
		if len(rest) < 2 {
			return m, malformed("truncated TLV header")
		}
		l := int(rest[1]) * 4
		if l == 0 || l > len(rest) {
			return m, malformed("TLV %d: length %d words with %d bytes left", rest[0], rest[1], len(rest))
		}
		m.TLVs = append(m.TLVs, TLV{Type: rest[0], Value: rest[2:l:l]})
		rest = rest[l:]
	}
	return m, nil
}

// addrTLV encodes a Connect or UDP TLV value: port, then a 128-bit address
// (IPv4 as IPv4-mapped IPv6).
func addrValue(ap netip.AddrPort) []byte {
	v := make([]byte, 18)
	binary.BigEndian.PutUint16(v[0:2], ap.Port())
	a := ap.Addr().As16()
	copy(v[2:], a[:])
	return v
}

func parseAddrValue(v []byte) (netip.AddrPort, error) {
	// Longer values carry TCP options (RFC 8803 §6.2.2); mptun ignores them.
	if len(v) < 18 {
		return netip.AddrPort{}, malformed("address TLV value of %d bytes, want at least 18", len(v))
	}
	port := binary.BigEndian.Uint16(v[0:2])
	a := netip.AddrFrom16([16]byte(v[2:18])).Unmap()
	return netip.AddrPortFrom(a, port), nil
}
