// Command mptun is a userspace Multipath TCP stack behind TUN devices.
//
//	mptun connect [--uplink IFACE[,via=GW][,backup]]... HOST:PORT
//	mptun listen  [--uplink IFACE]... [--once] :PORT
//	mptun server | client | genkey | status   (the bonding tunnel)
//
// `mptun` alone prints the usage, `mptun CMD -h` a command's flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

const usage = `mptun: userspace Multipath TCP (RFC 8684) over several uplinks

usage:
  mptun connect [--uplink IFACE[,via=GATEWAY][,backup]]... [flags] HOST:PORT
      open an MPTCP connection with one subflow per uplink; copy stdin to it
      and it to stdout; half-close when stdin ends; exit 0 when both are done
  mptun listen [--uplink IFACE]... [--once] [--deny-join-initial] [flags] :PORT
      accept MPTCP (and plain TCP) connections arriving over the uplinks

  mptun genkey
      print a new pre-shared key (32 random bytes, base64)
  mptun server --listen ADDR:PORT --key-file KEYFILE [--kernel] [--uplink IFACE]...
               [--metrics ADDR] [--allow-private] [--allow-fallback] [--deny-join-initial]
               [--config FILE]
      the concentrator: authenticates clients and relays their flows
  mptun client --server ADDR:PORT --key-file KEYFILE --uplink IFACE[,via=GATEWAY][,backup]...
               [--route PREFIX]... [--default-route] [--tun NAME] [--quic carry|reject] [--config FILE]
      carry every TCP and UDP flow routed into the tunnel TUN to the concentrator,
      one MPTCP connection per flow with one subflow per uplink
  mptun status [--json] [--tun NAME]
      show a running client's uplinks, connections and subflows (root)

common flags:
  --checksum        request DSS checksums
  --log-level L     debug, info, warn (default), error
  --stats           print connection statistics and MPTCP counters to stderr at the end
  --stats-every D   print per-subflow rates, RTT and cwnd to stderr every D (e.g. 1s)
  --mtu N           MTU of the uplinks' TUNs (default: each uplink's own)

mptun CMD -h lists a command's flags.
`

func main() {
	// MPTUN_CPUPROFILE=FILE writes a CPU profile (for the benchmarks).
	if f := os.Getenv("MPTUN_CPUPROFILE"); f != "" {
		if out, err := os.Create(f); err == nil {
			if err := pprof.StartCPUProfile(out); err == nil {
				code := run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
				pprof.StopCPUProfile()
				out.Close()
				os.Exit(code)
			}
		}
	}
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "connect":
		err = cmdConnect(ctx, args[1:], stdin, stdout, stderr)
	case "listen":
		err = cmdListen(ctx, args[1:], stdin, stdout, stderr)
	case "server":
		err = cmdServer(ctx, args[1:], stderr)
	case "genkey":
		err = cmdGenkey(args[1:], stdout)
	case "client":
		err = cmdClient(ctx, args[1:], stderr)
	case "status":
		err = cmdStatus(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "mptun: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	return report(stderr, args[0], err)
}

// report prints a command's error, the one place that does, so every
// error reads "mptun CMD: ...", and returns the exit status: 0 (none, or
// -h: the flags are printed already), 2 for usage errors (a refused flag
// also lists the flags), 130 when interrupted, 1 otherwise.
func report(stderr io.Writer, cmd string, err error) int {
	var ue usageError
	var fe *flagsError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &fe):
		fmt.Fprintf(stderr, "mptun %s: %v\n", cmd, err)
		printFlags(stderr, fe.fs)
		return 2
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "mptun %s: %v\n", cmd, err)
		return 2
	case errors.Is(err, context.Canceled):
		return 130
	}
	fmt.Fprintf(stderr, "mptun %s: %v\n", cmd, err)
	return 1
}

// usageError is a mistake on the command line (exit status 2).
type usageError struct{ error }

func newLogger(level string, w io.Writer) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, usageError{fmt.Errorf("--log-level %q: %w", level, err)}
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}
