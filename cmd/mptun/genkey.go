package main

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"strings"
)

// keyLen is the size of the pre-shared key.
const keyLen = 32

// cmdGenkey prints a new pre-shared key: 32 random bytes in base64.
func cmdGenkey(args []string, stdout io.Writer) error {
	if len(args) != 0 {
		return usageError{fmt.Errorf("unexpected arguments %q", args)}
	}
	var k [keyLen]byte
	if _, err := rand.Read(k[:]); err != nil {
		return fmt.Errorf("random key: %w", err)
	}
	_, err := fmt.Fprintln(stdout, base64.StdEncoding.EncodeToString(k[:]))
	return err
}

// parseKey decodes a key written by genkey.
func parseKey(text string) ([]byte, error) {
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(text))
	if err != nil {
		return nil, fmt.Errorf("not base64 (create one with `mptun genkey`): %w", err)
	}
	if len(k) != keyLen {
		return nil, fmt.Errorf("decodes to %d bytes, want exactly %d (create one with `mptun genkey`)", len(k), keyLen)
	}
	return k, nil
}

// readKeyFile reads the pre-shared key file.
func readKeyFile(path string) ([]byte, error) {
	if path == "" {
		return nil, usageError{fmt.Errorf("--key-file is required (create one with `mptun genkey > KEYFILE`)")}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	k, err := parseKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	return k, nil
}
