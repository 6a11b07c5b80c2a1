package hostnet

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// ifnameBytes is an interface name as nft compares it: NUL-padded to IFNAMSIZ.
func ifnameBytes(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func matchMeta(key expr.MetaKey, val []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: val},
	}
}

// snatExprs: iifname TUN oifname UPLINK snat ip to EXT.
func snatExprs(tunName, uplink string, ext netip.Addr) []expr.Any {
	e := matchMeta(expr.MetaKeyIIFNAME, ifnameBytes(tunName))
	e = append(e, matchMeta(expr.MetaKeyOIFNAME, ifnameBytes(uplink))...)
	return append(e,
		&expr.Immediate{Register: 1, Data: ext.AsSlice()},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	)
}

// dnatExprs: iifname UPLINK tcp dport PORT fib daddr type local dnat ip to
// STACK. Any local destination is taken, not only the uplink's own address:
// a joining subflow often targets an address of another uplink than the
// one it arrives on.
func dnatExprs(uplink string, port uint16, stack netip.Addr) []expr.Any {
	e := matchMeta(expr.MetaKeyIIFNAME, ifnameBytes(uplink))
	e = append(e, matchMeta(expr.MetaKeyL4PROTO, []byte{unix.IPPROTO_TCP})...)
	return append(e,
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
		&expr.Immediate{Register: 1, Data: stack.AsSlice()},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	)
}

func acceptExprs(key expr.MetaKey, name string) []expr.Any {
	return append(matchMeta(key, ifnameBytes(name)), &expr.Verdict{Kind: expr.VerdictAccept})
}

func (h *Host) nftConn() (*nftables.Conn, error) {
	c, err := nftables.New(nftables.WithNetNSFd(int(h.ns)))
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return c, nil
}

// marker tags rules we insert into other tables' chains, so Close and
// CleanupStale find them again.
func markerFor(instance string) []byte {
	return userdata.AppendString(nil, userdata.TypeComment, NFTablePrefix+instance)
}

// setupNFT creates our table with the NAT chain of the mode, and lets our
// traffic through forward chains with a drop policy (Docker sets one):
// nftables evaluates every base chain at a hook and any drop is final, so an
// accept in our own table would not help; the accept rules go into those
// chains, tagged with our marker.
func (h *Host) setupNFT() error {
	c, err := h.nftConn()
	if err != nil {
		return err
	}
	table := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: h.NFTable}
	// Delete a leftover table of the same name first (AddTable would merge).
	if t, err := c.ListTableOfFamily(h.NFTable, nftables.TableFamilyIPv4); err == nil && t != nil {
		return fmt.Errorf("nftables table ip %s exists already (another instance with id %q? run cleanup)", h.NFTable, h.Instance)
	}
	c.AddTable(table)
	switch h.Mode {
	case ModeConnect:
		ch := c.AddChain(&nftables.Chain{Name: "postrouting", Table: table, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
		for _, u := range h.Uplinks {
			c.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: snatExprs(u.TUNName, u.Spec.Iface, u.ExternalAddr)})
		}
	case ModeListen:
		ch := c.AddChain(&nftables.Chain{Name: "prerouting", Table: table, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
		for _, u := range h.Uplinks {
			c.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: dnatExprs(u.Spec.Iface, h.cfg.ListenPort, u.StackAddr)})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: create table ip %s: %w", h.NFTable, err)
	}
	h.push("delete nftables table ip "+h.NFTable, func() error {
		c, err := h.nftConn()
		if err != nil {
			return err
		}
		c.DelTable(table)
		return ignoreGone(c.Flush())
	})

	chains, err := dropForwardChains(c, h.NFTable)
	if err != nil {
		return err
	}
	if len(chains) == 0 {
		return nil
	}
	marker := markerFor(h.Instance)
	h.push("delete our rules in foreign forward chains", func() error {
		c, err := h.nftConn()
		if err != nil {
			return err
		}
		return deleteMarkedRules(c, chains, marker)
	})
	for _, ch := range chains {
		for _, u := range h.Uplinks {
			for _, key := range []expr.MetaKey{expr.MetaKeyIIFNAME, expr.MetaKeyOIFNAME} {
				c.InsertRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: acceptExprs(key, u.TUNName), UserData: marker})
			}
		}
		h.log.Info("accepting TUN traffic in a forward chain with drop policy",
			"table", ch.Table.Name, "chain", ch.Name)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: add accept rules to forward chains: %w", err)
	}
	return nil
}

// dropForwardChains lists forward-hook base chains with policy drop in ip
// and inet tables other than ours.
func dropForwardChains(c *nftables.Conn, own string) ([]*nftables.Chain, error) {
	chains, err := c.ListChains()
	if err != nil {
		return nil, fmt.Errorf("nftables: list chains: %w", err)
	}
	var out []*nftables.Chain
	for _, ch := range chains {
		if ch.Table == nil || ch.Table.Name == own || ch.Hooknum == nil || ch.Policy == nil {
			continue
		}
		if ch.Table.Family != nftables.TableFamilyIPv4 && ch.Table.Family != nftables.TableFamilyINet {
			continue
		}
		if *ch.Hooknum == *nftables.ChainHookForward && *ch.Policy == nftables.ChainPolicyDrop {
			out = append(out, ch)
		}
	}
	return out, nil
}

// deleteMarkedRules removes the rules carrying marker from chains.
func deleteMarkedRules(c *nftables.Conn, chains []*nftables.Chain, marker []byte) error {
	var errs []error
	for _, ch := range chains {
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue // chain or table gone
			}
			errs = append(errs, fmt.Errorf("list rules of %s %s: %w", ch.Table.Name, ch.Name, err))
			continue
		}
		for _, r := range rules {
			if bytes.Equal(r.UserData, marker) {
				if err := c.DelRule(r); err != nil {
					errs = append(errs, fmt.Errorf("delete rule %d in %s %s: %w", r.Handle, ch.Table.Name, ch.Name, err))
				}
			}
		}
	}
	if err := c.Flush(); err != nil {
		errs = append(errs, ignoreGone(err))
	}
	return errors.Join(errs...)
}
