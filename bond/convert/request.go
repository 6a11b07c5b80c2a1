package convert

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"

	"github.com/mptun/mptun/mptcpep/mpkey"
)

// TagLen is the length of the authenticator.
const TagLen = 16

// authLabel separates this use of the PSK from any other.
const authLabel = "mptun-auth-v1"

// AuthTag returns HMAC-SHA256(psk, "mptun-auth-v1" || clientKey || serverKey)
// truncated to 16 bytes. Binding it to the MPTCP keys of the connection
// means a captured request cannot be replayed on another connection. Where
// the keys are unknown (plain-TCP fallback, kernel MPTCP sockets) both keys
// are zero and the tag is replayable: see the server's AllowUnbound.
func AuthTag(psk []byte, clientKey, serverKey mpkey.Key) [TagLen]byte {
	m := hmac.New(sha256.New, psk)
	var b [len(authLabel) + 16]byte
	copy(b[:], authLabel)
	binary.BigEndian.PutUint64(b[len(authLabel):], uint64(clientKey))
	binary.BigEndian.PutUint64(b[len(authLabel)+8:], uint64(serverKey))
	m.Write(b[:])
	var t [TagLen]byte
	copy(t[:], m.Sum(nil))
	return t
}

// Kind says what a request asks for.
type Kind uint8

// Request kinds.
const (
	KindTCP Kind = iota + 1 // Connect TLV: a TCP connection to Dest
	KindUDP                 // UDP TLV: a UDP association with Dest
)

func (k Kind) String() string {
	switch k {
	case KindTCP:
		return "tcp"
	case KindUDP:
		return "udp"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Request is what the client sends first on every connection.
type Request struct {
	// HasAuth is false when the Auth TLV was missing (decoded requests).
	HasAuth bool
	Auth    [TagLen]byte
	Kind    Kind
	Dest    netip.AddrPort
}

// Verify reports whether the request carries the tag for these keys
// (constant time).
func (r *Request) Verify(psk []byte, clientKey, serverKey mpkey.Key) bool {
	if !r.HasAuth {
		return false
	}
	want := AuthTag(psk, clientKey, serverKey)
	return hmac.Equal(want[:], r.Auth[:])
}

// Message returns the request as a Convert message.
func (r *Request) Message() (Message, error) {
	var typ uint8
	switch r.Kind {
	case KindTCP:
		typ = TypeConnect
	case KindUDP:
		typ = TypeUDP
	default:
		return Message{}, fmt.Errorf("convert: request kind %d", r.Kind)
	}
	if !r.Dest.IsValid() {
		return Message{}, errors.New("convert: request without destination")
	}
	var m Message
	if r.HasAuth {
		auth := make([]byte, 2+TagLen)
		copy(auth[2:], r.Auth[:])
		m.TLVs = append(m.TLVs, TLV{Type: TypeAuth, Value: auth})
	}
	m.TLVs = append(m.TLVs, TLV{Type: typ, Value: addrValue(r.Dest)})
	return m, nil
}

// WriteRequest writes req in one Write call, so it leaves in one segment.
func WriteRequest(w io.Writer, req Request) error {
	m, err := req.Message()
	if err != nil {
		return err
	}
	b, err := m.Append(make([]byte, 0, m.Len()))
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("convert: write request: %w", err)
	}
	return nil
}

// readMessage reads one message; it never reads past it and never more
// than MaxMessageLen bytes. The caller bounds the time (a deadline).
func readMessage(r io.Reader, buf *[MaxMessageLen]byte) (Message, error) {
	if _, err := io.ReadFull(r, buf[:HeaderLen]); err != nil {
		return Message{}, fmt.Errorf("convert: read header: %w", err)
	}
	if buf[0] != Version {
		return Message{}, &ConvertError{Code: ErrUnsupported, Detail: fmt.Sprintf("version %d", buf[0])}
	}
	total := int(buf[1]) * 4
	if total < HeaderLen {
		return Message{}, malformed("total length %d words", buf[1])
	}
	if _, err := io.ReadFull(r, buf[HeaderLen:total]); err != nil {
		return Message{}, fmt.Errorf("convert: read message: %w", err)
	}
	return Decode(buf[:total])
}

// RequestFromMessage interprets a decoded message as a request. Errors are
// *ConvertError with the code to answer. A missing Auth TLV is not an
// error here (HasAuth false): the caller answers it with ErrNotAuthorized.
func RequestFromMessage(m Message) (Request, error) {
	var req Request
	for _, t := range m.TLVs {
		switch t.Type {
		case TypeAuth:
			if req.HasAuth {
				return req, malformed("two Auth TLVs")
			}
			if len(t.Value) != 2+TagLen {
				return req, malformed("Auth TLV value of %d bytes", len(t.Value))
			}
			req.HasAuth = true
			copy(req.Auth[:], t.Value[2:])
		case TypeConnect, TypeUDP:
			if req.Kind != 0 {
				return req, malformed("two destination TLVs")
			}
			d, err := parseAddrValue(t.Value)
			if err != nil {
				return req, err
			}
			req.Dest = d
			req.Kind = KindTCP
			if t.Type == TypeUDP {
				req.Kind = KindUDP
			}
		default:
			return req, &ConvertError{Code: ErrUnsupported, Detail: fmt.Sprintf("TLV type %d", t.Type)}
		}
	}
	if req.Kind == 0 {
		return req, malformed("no Connect or UDP TLV")
	}
	return req, nil
}

// ReadRequest reads and parses the client's request (at most MaxMessageLen
// bytes). Protocol errors are *ConvertError carrying the code to answer.
func ReadRequest(r io.Reader) (Request, error) {
	var buf [MaxMessageLen]byte
	m, err := readMessage(r, &buf)
	if err != nil {
		return Request{}, err
	}
	return RequestFromMessage(m)
}

// WriteReply writes the concentrator's answer: an empty message for
// success (code 0), or a message with one Error TLV.
func WriteReply(w io.Writer, code ErrorCode) error {
	b := []byte{Version, 1, 0, 0}
	if code != 0 {
		b = []byte{Version, 2, 0, 0, TypeError, 1, byte(code), 0}
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("convert: write reply: %w", err)
	}
	return nil
}

// ReadReply reads the concentrator's answer: nil for success, a
// *ConvertError for an Error TLV, another error for a broken stream.
func ReadReply(r io.Reader) error {
	var buf [MaxMessageLen]byte
	m, err := readMessage(r, &buf)
	if err != nil {
		return err
	}
	for _, t := range m.TLVs {
		if t.Type == TypeError {
			if len(t.Value) < 2 {
				return malformed("Error TLV value of %d bytes", len(t.Value))
			}
			return &ConvertError{Code: ErrorCode(t.Value[0])}
		}
	}
	return nil
}

// MaxDatagram is the largest datagram on a UDP association.
const MaxDatagram = 65535

// AppendDatagram appends p framed as a 2-byte big-endian length + payload.
func AppendDatagram(dst, p []byte) ([]byte, error) {
	if len(p) > MaxDatagram {
		return dst, fmt.Errorf("convert: datagram of %d bytes exceeds %d", len(p), MaxDatagram)
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(p)))
	return append(dst, p...), nil
}

// WriteDatagram writes p framed in one Write call. Concurrent writers must
// serialize.
func WriteDatagram(w io.Writer, p []byte) error {
	b, err := AppendDatagram(make([]byte, 0, 2+len(p)), p)
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("convert: write datagram: %w", err)
	}
	return nil
}

// ReadDatagram reads one framed datagram into buf and returns its length.
// A datagram larger than buf is consumed (the stream stays in sync) and
// reported as io.ErrShortBuffer. A clean end of stream between datagrams is
// io.EOF; inside one, io.ErrUnexpectedEOF.
func ReadDatagram(r io.Reader, buf []byte) (int, error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, err
	}
	n := int(binary.BigEndian.Uint16(h[:]))
	if n > len(buf) {
		if _, err := io.CopyN(io.Discard, r, int64(n)); err != nil {
			return 0, noEOF(err)
		}
		return 0, io.ErrShortBuffer
	}
	if _, err := io.ReadFull(r, buf[:n]); err != nil {
		return 0, noEOF(err)
	}
	return n, nil
}

func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
