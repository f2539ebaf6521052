#!/bin/sh
# Fair hand-off, as a user sees it: three looping `leasehold run` contenders on one key of a
# local `leasehold serve`, for SECS seconds; each 50 ms section appends "who start_ns end_ns".
# Prints sections per contender, the largest share, the gap from one section's end to the
# next one's start (p50, p90), and overlaps (must be 0).
#   scripts/contenders.sh target/debug/leasehold 20                  # the default (v2)
#   scripts/contenders.sh target/debug/leasehold 20 --protocol v1    # v1, polling
set -e
BIN=$1; SECS=$2; shift 2
D=$(mktemp -d)
"$BIN" serve --data "$D/store" --listen 127.0.0.1:0 > "$D/serve.out" &
SERVER=$!
while ! grep -q listening "$D/serve.out"; do sleep 0.05; done
URL=$(sed 's/listening on //' "$D/serve.out")
END=$(( $(date +%s) + SECS ))
PIDS=""
for c in a b c; do
  ( while [ "$(date +%s)" -lt $END ]; do
      "$BIN" run "$@" --key job --ttl 5s --server "$URL" -- \
        sh -c "s=\$(date +%s%N); sleep 0.05; echo $c \$s \$(date +%s%N) >> $D/log"
    done ) 2>/dev/null &
  PIDS="$PIDS $!"
done
wait $PIDS
kill $SERVER
python3 - "$D/log" <<'PY'
import collections, sys
rows = sorted(((c, int(s), int(e)) for c, s, e in (l.split() for l in open(sys.argv[1]))), key=lambda r: r[1])
n = collections.Counter(r[0] for r in rows)
gaps = sorted((b[1] - a[2]) / 1e6 for a, b in zip(rows, rows[1:]))
p = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))]
overlaps = sum(1 for a, b in zip(rows, rows[1:]) if b[1] < a[2])
print(f"sections {len(rows)} per contender {dict(sorted(n.items()))} largest share "
      f"{max(n.values()) / len(rows):.2f} gap p50 {p(0.5):.1f} ms p90 {p(0.9):.1f} ms overlaps {overlaps}")
PY
