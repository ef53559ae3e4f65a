#!/usr/bin/env bash
# Replay speed: recorded tool calls per second through `toolgate replay`, on one core.
#
#   scripts/replay-bench.sh            # 200 000 calls, release build, pinned to CPU 0
#   CALLS=50000 TOOLGATE=path/to/toolgate scripts/replay-bench.sh
#
# Writes a synthetic day of `tool_call` events for the bundled policies (config/toolgate.yaml,
# policies/): knowledge-base searches, ticket reads and replies, fraud checks and refunds (with
# the history rules they need), across three agents and a few hundred sessions, a tenth of them
# refused at the allowlist. Then replays them against the bundled policies, and prints the rate.
# The time includes reading and parsing the file: what a CI job waits for.
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS=${CALLS:-200000}
TOOLGATE=${TOOLGATE:-target/release/toolgate}
[ -x "$TOOLGATE" ] || cargo build --release --locked
work=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
python3 - "$CALLS" > "$work/audit.jsonl" <<'PY'
import json, sys, uuid, random
from datetime import datetime, timedelta, timezone
random.seed(7)
n = int(sys.argv[1])
t = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
step = timedelta(seconds=86400 / n)
def line(agent, tool, args, decision="allow", code=None, reasons=(), session=None):
    return json.dumps({"ts": t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z", "event": "tool_call",
        "request_id": str(uuid.UUID(int=random.getrandbits(128))), "source": "10.0.0.7", "session": session,
        "agent": agent, "tool": tool, "decision": decision, "code": code, "reasons": list(reasons),
        "arguments": args, "arguments_sha256": "0" * 64, "upstream": {"status": 200, "duration_ms": 3.1},
        "tokens": None, "approval_id": None, "would_deny": [], "duration_ms": 4.2, "policy_version": "bench",
        "prev": "0" * 64}, separators=(",", ":"))
out = []
refunds = []  # times of support-bot's refunds that went through (the rule allows 3 an hour)
for i in range(n):
    t += step
    s = f"s-{i // 400}"
    r = random.random()
    if r < 0.4:
        out.append(line("support-bot", "kb.search", {"query": f"how do I reset 2fa {i}", "limit": 5}, session=s))
    elif r < 0.6:
        out.append(line("support-bot", "tickets.read", {"ticket_id": f"T-{i}"}, session=s))
    elif r < 0.7:
        out.append(line("support-bot", "tickets.reply", {"ticket_id": f"T-{i}", "body": "We have reset your second factor; please sign in again."}, session=s))
    elif r < 0.8:
        order = f"O-{i}"
        out.append(line("support-bot", "fraud.check", {"order_id": order}, session=s))
        t += step
        refunds = [x for x in refunds if t - x < timedelta(hours=1)]
        if len(refunds) >= 3:
            out.append(line("support-bot", "billing.refund", {"order_id": order, "amount": 20}, "deny", "rule_denied",
                [{"stage": "rules", "rule": "refunds-at-most-3-per-hour", "message": "at most 3 an hour"}], session=s))
        else:
            refunds.append(t)
            out.append(line("support-bot", "billing.refund", {"order_id": order, "amount": 20}, session=s))
    elif r < 0.9:
        out.append(line("analyst-bot", "kb.search", {"query": f"refund volume {i}"}, session=s))
    else:
        out.append(line("analyst-bot", "billing.refund", {"order_id": f"O-{i}", "amount": 5}, "deny", "tool_not_allowed",
            [{"stage": "allowlist", "rule": "allowlist", "message": "not allowed"}], session=s))
    if len(out) >= n:
        break
print("\n".join(out[:n]))
PY
lines=$(wc -l < "$work/audit.jsonl")
bytes=$(stat -c %s "$work/audit.jsonl")
start=$(date +%s.%N)
set +e
taskset -c 0 "$TOOLGATE" replay -c config/toolgate.yaml --audit "$work/audit.jsonl" --format json > "$work/report.json"
code=$?
set -e
end=$(date +%s.%N)
[ "$code" -le 1 ] || { echo "replay failed ($code)" >&2; exit 1; }
python3 - "$work/report.json" "$lines" "$bytes" "$start" "$end" <<'PY'
import json, sys
report, lines, size, start, end = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
secs = end - start
print(f"replayed {report['replayed']} of {lines} calls ({size / 1e6:.1f} MB) in {secs:.2f} s on one core: "
      f"{report['replayed'] / secs:,.0f} calls/s; {len(report['changed'])} changed, {len(report['uncertain'])} uncertain")
PY
