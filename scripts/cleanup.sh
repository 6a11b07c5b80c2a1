#!/usr/bin/env bash
# Removes every network namespace, link, policy rule and nftables table/rule
# that mptun's tests, lab, benchmarks or a crashed mptun left behind in the
# current network (and mount) namespace. Idempotent and safe when nothing
# exists; exits non-zero only if something matching could not be removed.
#
# It removes resources by name prefix, whoever owns them: on a machine shared
# with other mptun developers run it only inside scripts/isolated.sh (as
# `make test` does), never on the host while someone else's tests run.
#
# Prefixes (grep the tests before adding a new one, and add it here):
#   namespaces  mtc-* (integration kernel capture), mpi-* (integration
#               interop), mbc-* (integration bonding), mtt-* (tun),
#               mtl-* (lab, bench), mth-* (hostnet),
#               mte-*, mtn-* (reserved: engine/netstack tests),
#               moc-* (scripts/option-cost.sh)
#   links       mtc*, mtt*, mtl*, mth*, mte*, mtn*, mpi*, mbc*, mpt* (hostnet
#               TUNs <prefix><instance>u<N>, bond/client's mptun0, test veths)
#   nftables    tables mptun_*, and rules commented mptun_* in other tables
#   rules       policy rules whose iif is one of the links above, plus the
#               rules and routes of the tables they point to; bond/client's
#               rules at priorities 7299-7301 and its table 28016 (0x6d70)
set -uo pipefail

if [ "$(id -u)" -ne 0 ]; then
	echo "cleanup: not root, nothing to do (only root can create what it removes)" >&2
	exit 0
fi

ns_re='^(mtc|mtt|mtl|mth|mte|mtn|mpi|mbc|moc)-'
link_re='^(mtc|mtt|mtl|mth|mte|mtn|mpi|mbc|mpt)'
failed=0
removed=0

note() { echo "cleanup: $*" >&2; }

# Namespaces: kill what still runs inside (iperf3 -s, socat, emulators
# started with ip netns exec), then delete. Processes in a namespace keep it
# alive after `ip netns del`, with their veths and TUNs.
if command -v ip >/dev/null; then
	for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "$ns_re"); do
		pids=$(ip netns pids "$ns" 2>/dev/null | grep -vx "$$" || true)
		if [ -n "$pids" ]; then
			# shellcheck disable=SC2086 # one pid per word
			kill -TERM $pids 2>/dev/null || true
			for _ in 1 2 3 4 5 6 7 8 9 10; do
				[ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break
				sleep 0.2
			done
			pids=$(ip netns pids "$ns" 2>/dev/null || true)
			# shellcheck disable=SC2086
			[ -n "$pids" ] && kill -KILL $pids 2>/dev/null
		fi
		if ip netns del "$ns" 2>/dev/null || ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
			note "removed namespace $ns"
			removed=$((removed + 1))
		else
			note "could not remove namespace $ns"
			failed=1
		fi
	done

	# Policy rules from our TUNs (hostnet: "iif <tun> lookup T" and
	# "from <uplink addr> lookup T" at the same priority), and their tables.
	# Collect before deleting the links: the iif names are what identify them.
	declare -A stale_tables=()
	while read -r pref table; do
		[ -n "$table" ] && stale_tables["$pref $table"]=1
	done < <(ip -4 rule show 2>/dev/null | awk -v re="$link_re" '
		{ pref = $1; sub(":", "", pref); iif = ""; tbl = ""
		  for (i = 2; i < NF; i++) {
			if ($i == "iif") iif = $(i + 1)
			if ($i == "lookup") tbl = $(i + 1)
		  }
		  if (iif ~ re && tbl != "") print pref, tbl }')
	for key in "${!stale_tables[@]}"; do
		read -r pref table <<<"$key"
		while ip -4 rule del pref "$pref" table "$table" 2>/dev/null; do :; done
		ip -4 route flush table "$table" 2>/dev/null || true
		note "removed policy rules at priority $pref and routes of table $table"
		removed=$((removed + 1))
	done

	# bond/client's default-route rules (wg-quick style, priorities
	# 7299-7301): into its table 0x6d70 (28016, "mp") and the suppress and
	# exclude rules into main at those priorities. Its TUN is mptun0.
	for fam in -4 -6; do
		while read -r pref table; do
			while ip "$fam" rule del pref "$pref" table "$table" 2>/dev/null; do :; done
			note "removed bond/client rules ($fam) at priority $pref into table $table"
			removed=$((removed + 1))
		done < <(ip "$fam" rule show 2>/dev/null | awk '
			{ pref = $1; sub(":", "", pref); tbl = ""
			  for (i = 2; i < NF; i++) if ($i == "lookup") tbl = $(i + 1)
			  if (pref >= 7299 && pref <= 7301 && (tbl == "28016" || tbl == "main")) print pref, tbl }' | sort -u)
		if [ -n "$(ip "$fam" route show table 28016 2>/dev/null)" ]; then
			ip "$fam" route flush table 28016 2>/dev/null || true
			note "flushed routing table 28016 ($fam)"
			removed=$((removed + 1))
		fi
	done

	for link in $(ip -o link show 2>/dev/null | awk -F': ' '{sub("@.*", "", $2); print $2}' | grep -E "$link_re"); do
		if ip link del "$link" 2>/dev/null || ! ip link show "$link" >/dev/null 2>&1; then
			note "removed link $link"
			removed=$((removed + 1))
		else
			note "could not remove link $link"
			failed=1
		fi
	done
fi

if command -v nft >/dev/null; then
	# Whole tables of ours.
	while read -r _ family table; do
		[ -z "$table" ] && continue
		case "$table" in
		mptun_*)
			if nft delete table "$family" "$table" 2>/dev/null; then
				note "removed nft table $family $table"
				removed=$((removed + 1))
			else
				note "could not remove nft table $family $table"
				failed=1
			fi
			;;
		esac
	done < <(nft list tables 2>/dev/null)
	# Accept rules hostnet inserts into other tables' forward chains carry the
	# comment mptun_<instance>; remove them by handle.
	while read -r family table chain handle; do
		if nft delete rule "$family" "$table" "$chain" handle "$handle" 2>/dev/null; then
			note "removed nft rule $family $table $chain handle $handle"
			removed=$((removed + 1))
		else
			note "could not remove nft rule $family $table $chain handle $handle"
			failed=1
		fi
	done < <(nft -a list ruleset 2>/dev/null | awk '
		$1 == "table" { family = $2; table = $3 }
		$1 == "chain" { chain = $2 }
		/comment "mptun_/ && / handle [0-9]+$/ { print family, table, chain, $NF }')
fi

if [ "$removed" -eq 0 ] && [ "$failed" -eq 0 ]; then
	note "nothing to remove"
fi
exit "$failed"
