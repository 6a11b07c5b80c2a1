package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/mptun/mptun/bond/client"
)

// cmdStatus asks a running client for its state over the control socket.
func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print the raw JSON")
	name := fs.String("tun", client.DefaultTUNName, "tunnel `NAME` of the client to ask")
	socket := fs.String("socket", "", "control socket `PATH` (default /run/mptun/<tun>.sock)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError{fmt.Errorf("unexpected arguments %q", fs.Args())}
	}
	if *socket == "" {
		*socket = client.SocketPath(*name)
	}
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	raw, err := client.QueryControl(qctx, *socket)
	if err != nil {
		return err
	}
	if *asJSON {
		_, err := fmt.Fprintln(stdout, string(raw))
		return err
	}
	var st client.Status
	if err := json.Unmarshal(raw, &st); err != nil {
		return fmt.Errorf("reply from %s: %w", *socket, err)
	}
	return printStatus(stdout, &st)
}

func mbps(bps uint64) string { return fmt.Sprintf("%.1f", float64(bps)/1e6) }

// printStatus writes the human-readable status.
func printStatus(w io.Writer, st *client.Status) error {
	fmt.Fprintf(w, "mptun client %s (pid %d) -> %s, up %s\n", st.Name, st.PID, st.Server,
		time.Since(st.Started).Round(time.Second))
	f := st.Flows
	fmt.Fprintf(w, "flows: tcp %d active / %d total, %d refused, %d failed; udp %d active / %d total; quic rejected %d; key refused %d\n",
		f.TCPActive, f.TCPFlows, f.TCPRefused, f.TCPFailed, f.UDPActive, f.UDPAssociations, f.QUICRejected, f.AuthRefused)
	if f.LastError != "" {
		fmt.Fprintf(w, "last error: %s\n", f.LastError)
	}
	fmt.Fprintf(w, "\nuplinks (rates over the last %.1f s):\n", st.Interval)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  IFACE\tADDR\tGATEWAY\tSTATE\tBACKUP\tSUBFLOWS\tTX Mbit/s\tRX Mbit/s")
	for _, u := range st.Uplinks {
		state := "up"
		if !u.Up {
			state = "DOWN"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%v\t%d\t%s\t%s\n", u.Iface, u.Addr, u.Gateway, state, u.Backup, u.Subflows, mbps(u.TxBps), mbps(u.RxBps))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// Busiest connections first.
	sort.Slice(st.Conns, func(i, j int) bool {
		return st.Conns[i].BytesSent+st.Conns[i].BytesReceived > st.Conns[j].BytesSent+st.Conns[j].BytesReceived
	})
	fmt.Fprintf(w, "\nconnections: %d\n", len(st.Conns))
	for _, c := range st.Conns {
		kind := "mptcp"
		if !c.MPTCP {
			kind = "tcp-fallback"
		}
		fmt.Fprintf(w, "  %s -> %s (%s, sent %d, received %d, reinjected %d)\n", c.Local, c.Remote, kind, c.BytesSent, c.BytesReceived, c.Reinjected)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "    SUBFLOW\tSTATE\tBACKUP\tRTT ms\tCWND\tTX Mbit/s\tRX Mbit/s\tRETRANS\tLOSS %\tCC\tPACING Mbit/s\tBW Mbit/s\tMIN RTT ms")
		for _, sf := range c.Subflows {
			cc, pacing, bw, minRTT := "-", "-", "-", "-"
			if sf.CC != "" {
				cc, pacing, bw, minRTT = sf.CC+"/"+sf.CCState, mbps(sf.PacingBps), mbps(sf.BtlBwBps), fmt.Sprintf("%.1f", sf.MinRTTms)
			}
			fmt.Fprintf(tw, "    %s\t%s\t%v\t%.1f\t%d\t%s\t%s\t%d\t%.2f\t%s\t%s\t%s\t%s\n", sf.Local, sf.State, sf.Backup, sf.RTTms, sf.Cwnd,
				mbps(sf.TxBps), mbps(sf.RxBps), sf.Retransmits, sf.LossPct, cc, pacing, bw, minRTT)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}
