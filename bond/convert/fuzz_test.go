package convert

import (
	"bytes"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzDecode checks that Decode never panics, that what it accepts
// re-encodes to the same bytes, and that ReadRequest/ReadReply only fail
// with sensible errors and never read past the message.
func FuzzDecode(f *testing.F) {
	f.Add([]byte{1, 1, 0, 0})
	f.Add([]byte{1, 2, 0, 0, 30, 1, 32, 0})
	f.Add(append([]byte{1, 6, 0, 0, 10, 5, 0, 80}, make([]byte, 16)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err == nil {
			out, err := m.Append(nil)
			require.NoError(t, err)
			// The unassigned header bits are ignored and sent as zero.
			want := bytes.Clone(b)
			want[2], want[3] = 0, 0
			require.Equal(t, want, out)
		} else {
			var ce *ConvertError
			require.True(t, errors.As(err, &ce), "%v", err)
		}
		r := bytes.NewReader(b)
		req, err := ReadRequest(r)
		if err == nil {
			// A valid request round-trips to an equivalent request.
			var w bytes.Buffer
			require.NoError(t, WriteRequest(&w, req))
			again, err := ReadRequest(&w)
			require.NoError(t, err)
			require.Equal(t, req, again)
		}
		require.LessOrEqual(t, int(r.Size())-r.Len(), MaxMessageLen)
		_ = ReadReply(bytes.NewReader(b))
		_, _ = ReadDatagram(bytes.NewReader(b), make([]byte, 64))
	})
}
