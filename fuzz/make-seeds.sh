#!/usr/bin/env bash
# Regenerates the seed corpora in fuzz/seeds/ from tests/fixtures/*.json and
# tests/vectors/published.json. Needs python3 and builds the dinghook binary (for `encrypt`).
# The seeds are committed; the corpus libFuzzer grows goes to fuzz/corpus/ (ignored).
#
# Input formats are described at the top of each target in fuzz/fuzz_targets/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bin dinghook
rm -rf fuzz/seeds && mkdir -p fuzz/seeds/callback_request fuzz/seeds/failed_list

# Raw-mode requests for callback_request, signed with the development keys at the target's clock.
requests=$(mktemp -d)
trap 'rm -rf "$requests"' EXIT
for fixture in tests/fixtures/chat_update_title.legacy.json tests/fixtures/todo_task_create.current.json \
    tests/fixtures/attendance_check_record.current.json; do
    target/debug/dinghook encrypt --config config/dev.toml --json \
        --timestamp 1699999999000 --nonce fuzzseed "$fixture" >"$requests/$(basename "$fixture")"
done

python3 - "$requests" <<'EOF'
import glob, json, os, sys, urllib.parse

requests = sys.argv[1]
seeds = "fuzz/seeds"

def write(target, name, data):
    with open(os.path.join(seeds, target, name), "wb") as f:
        f.write(data)

fixtures = sorted(glob.glob("tests/fixtures/*.json"))
vectors = json.load(open("tests/vectors/published.json"))["vectors"]

# callback_request, signed mode (odd first byte): the rest is the plaintext. 0x01 is the current
# key and owner key, timestamp in ms, msg_signature spelling, plain body.
for path in fixtures:
    name = os.path.basename(path)[: -len(".json")]
    write("callback_request", f"signed-{name}", b"\x01" + open(path, "rb").read().strip())
for i, v in enumerate(vectors):
    if "plaintext" in v:
        write("callback_request", f"signed-vector-{i}", b"\x01" + v["plaintext"].encode())
# A few flag combinations: previous key, wrong owner, seconds, other spelling, padded body.
sample = open("tests/fixtures/todo_task_update.current.json", "rb").read().strip()
for flags in (0x03, 0x09, 0x0D, 0x11, 0x21, 0x41, 0x81):
    write("callback_request", f"signed-flags-{flags:02x}", bytes([flags]) + sample)

# callback_request, raw mode (even first byte): query, newline, body. 0x02 turns the window on.
for path in sorted(glob.glob(os.path.join(requests, "*.json"))):
    name = os.path.basename(path)[: -len(".json")]
    r = json.load(open(path))
    query = urllib.parse.urlsplit(r["url"]).query
    body = json.dumps(r["body"], separators=(",", ":"))
    write("callback_request", f"raw-{name}", b"\x02" + query.encode() + b"\n" + body.encode())
# The published vectors' requests (their own token: they stop at the signature).
for i, v in enumerate(vectors):
    query = urllib.parse.urlencode(
        {"msg_signature": v["signature"], "timestamp": v["timestamp"], "nonce": v["nonce"]})
    body = json.dumps({"encrypt": v["encrypt"]})
    write("callback_request", f"raw-vector-{i}", b"\x00" + query.encode() + b"\n" + body.encode())

# failed_list: whole answers of get_call_back_failed_result, in the shapes seen or documented.
def tag_of(fixture):
    return os.path.basename(fixture).split(".")[0]

def entry(tag, value, time=1700000000000):
    return {"call_back_tag": tag, "event_time": time, tag: value}

def answer(entries, has_more=False):
    return json.dumps({"errcode": 0, "errmsg": "ok", "has_more": has_more,
                       "failed_list": entries}, ensure_ascii=False).encode()

for i, path in enumerate(fixtures):
    payload = json.load(open(path))
    tag = tag_of(path)
    name = os.path.basename(path)[: -len(".json")]
    shapes = {
        "nested": {"corpid": "dingcorp1", "callbackData": payload},
        "string": {"corpid": "dingcorp1", "callbackData": json.dumps(payload, ensure_ascii=False)},
        "bare": payload,
    }
    shape = list(shapes)[i % 3]
    write("failed_list", f"{shape}-{name}", answer([entry(tag, shapes[shape])], has_more=i % 2 == 0))

write("failed_list", "mixed", answer([
    entry("user_add_org", {"userid": ["u1", "u2"], "corpid": "dingcorp1"}),
    entry("user_modify_org", "{corpid=dingcorp1}", time="1700000000001"),
    entry("bpms_task_change", {"corpid": "dingcorp1", "bpmsCallBackData": {"processInstanceId": "p1"}}),
    entry("label_user_change", {"corpid": "dingcorp1", "roleLabelChange": "{\"action\":\"add\"}"}),
    entry("check_url", {}),
    {"call_back_tag": 7},
    "not an object",
    {"event_time": None},
], has_more="true"))
write("failed_list", "empty", b'{"errcode":0,"errmsg":"ok","has_more":false,"failed_list":[]}')
write("failed_list", "blank", b" \n")
EOF
echo "seeds: $(ls fuzz/seeds/callback_request | wc -l) callback_request, $(ls fuzz/seeds/failed_list | wc -l) failed_list"
