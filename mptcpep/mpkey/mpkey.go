// Package mpkey holds the MPTCP connection key and what RFC 8684 derives
// from it: token, initial data sequence number and the HMACs of MP_JOIN
// and ADD_ADDR. It depends on the standard library only, so packages that
// bind to a connection's keys (bond/convert) do not pull in gVisor.
package mpkey

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Key is a 64-bit MPTCP connection key (RFC 8684 3.1). On the wire and in
// every hash it is encoded big-endian.
type Key uint64

// newKeyAttempts bounds the retries for a zero key; a reader returning
// zeros that often is broken, not unlucky.
const newKeyAttempts = 8

// ErrZeroKey is returned by NewKey when the reader keeps producing zeros.
var ErrZeroKey = errors.New("mptcp: random source produced only zero keys")

// NewKey draws a random non-zero key from r (crypto/rand.Reader in
// production). Zero is avoided because implementations use it to mean
// "no key yet".
func NewKey(r io.Reader) (Key, error) {
	var b [8]byte
	for range newKeyAttempts {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return 0, fmt.Errorf("mptcp: reading random key: %w", err)
		}
		if k := Key(binary.BigEndian.Uint64(b[:])); k != 0 {
			return k, nil
		}
	}
	return 0, ErrZeroKey
}

func (k Key) digest() [sha256.Size]byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(k))
	return sha256.Sum256(b[:])
}

// Token is the most significant 32 bits of SHA-256 of the key; it names
// the connection in MP_JOIN SYNs.
func (k Key) Token() uint32 {
	d := k.digest()
	return binary.BigEndian.Uint32(d[:4])
}

// IDSN is the initial data sequence number: the least significant 64 bits
// of SHA-256 of the key.
func (k Key) IDSN() uint64 {
	d := k.digest()
	return binary.BigEndian.Uint64(d[sha256.Size-8:])
}

// TokenIDSN returns both with a single hash.
func (k Key) TokenIDSN() (uint32, uint64) {
	d := k.digest()
	return binary.BigEndian.Uint32(d[:4]), binary.BigEndian.Uint64(d[sha256.Size-8:])
}

// HMAC is HMAC-SHA256 keyed with keyA||keyB (both big-endian), as Linux's
// mptcp_crypto_hmac_sha.
func HMAC(keyA, keyB Key, msg []byte) [32]byte {
	var k [16]byte
	binary.BigEndian.PutUint64(k[0:], uint64(keyA))
	binary.BigEndian.PutUint64(k[8:], uint64(keyB))
	m := hmac.New(sha256.New, k[:])
	m.Write(msg)
	var out [32]byte
	m.Sum(out[:0])
	return out
}

func joinHMAC(localKey, remoteKey Key, localNonce, remoteNonce uint32) [32]byte {
	var msg [8]byte
	binary.BigEndian.PutUint32(msg[0:], localNonce)
	binary.BigEndian.PutUint32(msg[4:], remoteNonce)
	return HMAC(localKey, remoteKey, msg[:])
}

// JoinSYNACKHMAC is the truncated HMAC a responder sends in its MP_JOIN
// SYN/ACK: the leftmost 64 bits of HMAC(local||remote, localNonce||
// remoteNonce), "local" being the responder. The initiator verifies it by
// calling this with the keys and nonces swapped to the responder's view.
func JoinSYNACKHMAC(localKey, remoteKey Key, localNonce, remoteNonce uint32) uint64 {
	h := joinHMAC(localKey, remoteKey, localNonce, remoteNonce)
	return binary.BigEndian.Uint64(h[:8])
}

// JoinACKHMAC is the initiator's MP_JOIN third-ACK HMAC: the leftmost 160
// bits of HMAC(local||remote, localNonce||remoteNonce), "local" being the
// initiator.
func JoinACKHMAC(localKey, remoteKey Key, localNonce, remoteNonce uint32) [20]byte {
	h := joinHMAC(localKey, remoteKey, localNonce, remoteNonce)
	return [20]byte(h[:20])
}

// AddAddrHMAC is the ADD_ADDR truncated HMAC (RFC 8684 3.4.1): key =
// sender's key || receiver's key, message = address ID || address (4 or 16
// bytes) || port (2 bytes, zero when no port is announced); the option
// carries the RIGHTMOST 64 bits (unlike MP_JOIN, which takes the leftmost).
// An IPv4-mapped IPv6 address is hashed as IPv6, as it is sent.
func AddAddrHMAC(senderKey, receiverKey Key, addrID uint8, addr netip.Addr, port uint16) uint64 {
	var msg [1 + 16 + 2]byte
	msg[0] = addrID
	n := 1
	if addr.Is4() {
		a := addr.As4()
		n += copy(msg[n:], a[:])
	} else {
		a := addr.As16()
		n += copy(msg[n:], a[:])
	}
	binary.BigEndian.PutUint16(msg[n:], port)
	n += 2
	h := HMAC(senderKey, receiverKey, msg[:n])
	return binary.BigEndian.Uint64(h[len(h)-8:])
}
