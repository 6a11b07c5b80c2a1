package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

// The bench binary doubles as the kernel-side peer of `mptun connect`
// (iperf3 cannot talk through a netcat-like program): run as
// `bench mpsink -mode recv|send -listen ADDR:PORT`, it accepts one
// connection with a kernel MPTCP socket (plain TCP is accepted too), then
// counts what arrives until EOF (recv) or sends zeros for -duration and
// half-closes (send). It prints "ready" once it listens and one JSON
// sinkResult at the end. Re-executing the runner's own binary keeps the
// peer's CPU time out of the runner's and needs no second build.

// sinkResult is what the peer reports.
type sinkResult struct {
	Mode string `json:"mode"`
	// Bytes received (recv) or sent (send).
	Bytes uint64 `json:"bytes"`
	// Seconds from the first byte to EOF (recv) or of sending (send).
	Seconds float64 `json:"seconds"`
	// MPTCP is whether the accepted socket is MPTCP (false: fallback).
	MPTCP bool `json:"mptcp"`
	// CPUSeconds is this process's user+system time.
	CPUSeconds float64 `json:"cpu_s"`
}

func mpsinkMain(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("mpsink", flag.ContinueOnError)
	mode := fs.String("mode", "recv", "recv: count until EOF; send: send zeros for -duration")
	listen := fs.String("listen", "", "ADDR:PORT to accept one connection on")
	dur := fs.Duration("duration", 10*time.Second, "send mode: how long to send")
	timeout := fs.Duration("timeout", 2*time.Minute, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *mode != "recv" && *mode != "send" {
		return fmt.Errorf("-mode %q: want recv or send", *mode)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var lc net.ListenConfig
	lc.SetMultipathTCP(true)
	ln, err := lc.Listen(ctx, "tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *listen, err)
	}
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	if _, err := fmt.Fprintln(stdout, "ready"); err != nil {
		return fmt.Errorf("ready: %w", err)
	}
	c, err := ln.Accept()
	if err != nil {
		return fmt.Errorf("accept: %w", err)
	}
	// The listener stays open: Linux accepts MP_JOIN SYNs on it, and a
	// closed listener answers them with RST.
	conn := c.(*net.TCPConn)
	defer conn.Close()
	stopConn := context.AfterFunc(ctx, func() { conn.Close() })
	defer stopConn()
	res := sinkResult{Mode: *mode}
	res.MPTCP, _ = conn.MultipathTCP()
	report := func() error {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			return fmt.Errorf("getrusage: %w", err)
		}
		res.CPUSeconds = time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
		if err := json.NewEncoder(stdout).Encode(res); err != nil {
			return fmt.Errorf("result: %w", err)
		}
		return nil
	}
	if *mode == "recv" {
		if res.Bytes, res.Seconds, err = countUntilEOF(conn, nil); err != nil {
			return err
		}
		return report()
	}
	if res.Bytes, res.Seconds, err = sendFor(conn, *dur); err != nil {
		return err
	}
	// Reported before waiting for the peer's EOF: the runner learns how many
	// bytes to expect and only then ends the other direction.
	if err := report(); err != nil {
		return err
	}
	if _, err := io.Copy(io.Discard, conn); err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	return nil
}

// countUntilEOF reads r to the end; the time runs from the first to the
// last byte so neither connection set-up nor teardown counts against
// goodput (as in iperf3). progress, if set, gets the running total.
func countUntilEOF(r io.Reader, progress func(uint64)) (n uint64, secs float64, err error) {
	buf := make([]byte, 256<<10)
	var first, last time.Time
	for {
		k, err := r.Read(buf)
		if k > 0 {
			last = time.Now()
			if first.IsZero() {
				first = last
			}
			n += uint64(k)
			if progress != nil {
				progress(n)
			}
		}
		if errors.Is(err, io.EOF) {
			if first.IsZero() {
				return 0, 0, errors.New("connection closed before any data")
			}
			return n, last.Sub(first).Seconds(), nil
		}
		if err != nil {
			return n, 0, fmt.Errorf("read after %d bytes: %w", n, err)
		}
	}
}

// sendFor writes zeros for d and half-closes.
func sendFor(c *net.TCPConn, d time.Duration) (n uint64, secs float64, err error) {
	buf := make([]byte, 256<<10)
	start := time.Now()
	end := start.Add(d)
	for time.Now().Before(end) {
		k, err := c.Write(buf)
		n += uint64(k)
		if err != nil {
			return n, 0, fmt.Errorf("write after %d bytes: %w", n, err)
		}
	}
	secs = time.Since(start).Seconds()
	if err := c.CloseWrite(); err != nil {
		return n, secs, fmt.Errorf("close write: %w", err)
	}
	return n, secs, nil
}

// runMpsinkIfAsked runs the peer mode when the binary was started as one.
func runMpsinkIfAsked() {
	if len(os.Args) > 1 && os.Args[1] == "mpsink" {
		if err := mpsinkMain(os.Args[2:], os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "mpsink:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}
