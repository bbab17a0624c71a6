"""The OpenAI Batch API through AI Hub with the official `openai` Python SDK, unchanged but for
its base URL: upload a JSONL file, create a batch, poll it to `completed`, download the output
and error files. Run by cli/tests/batches.rs.

Usage: batch_sdk.py BASE_URL API_KEY MODEL GOOD_LINES
Prints one JSON object with what it saw (the test checks it).
"""

import io
import json
import sys
import time

import openai

base_url, api_key, model, good = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

lines = [
    {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Say {i}"}]},
    }
    for i in range(good)
]
# One request that fails when it runs (no such model): it lands in the error file.
lines.insert(good // 2, {
    "custom_id": "req-bad",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
})
data = "\n".join(json.dumps(l) for l in lines).encode()

uploaded = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
assert uploaded.object == "file" and uploaded.purpose == "batch", uploaded
assert uploaded.bytes == len(data), (uploaded.bytes, len(data))
retrieved = client.files.retrieve(uploaded.id)
assert retrieved.filename == "input.jsonl", retrieved
assert client.files.content(uploaded.id).read() == data

batch = client.batches.create(
    input_file_id=uploaded.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"purpose": "sdk test"},
)
assert batch.object == "batch" and batch.status == "validating", batch
seen = {batch.status}
deadline = time.time() + 120
while batch.status not in ("completed", "failed", "expired", "cancelled"):
    if time.time() > deadline:
        raise SystemExit(f"batch stuck in {batch.status}")
    time.sleep(0.2)
    batch = client.batches.retrieve(batch.id)
    seen.add(batch.status)

output = client.files.content(batch.output_file_id).text if batch.output_file_id else ""
errors = client.files.content(batch.error_file_id).text if batch.error_file_id else ""
out_lines = [json.loads(l) for l in output.splitlines() if l]
err_lines = [json.loads(l) for l in errors.splitlines() if l]
listed = [b.id for b in client.batches.list(limit=10)]
files = [f.id for f in client.files.list()]

# Errors keep the OpenAI shape through the SDK.
try:
    client.batches.retrieve("batch_does_not_exist")
    missing = None
except openai.NotFoundError as e:
    missing = e.status_code
try:
    client.batches.cancel(batch.id)
    cancel_finished = None
except openai.APIStatusError as e:
    cancel_finished = e.status_code

deleted = client.files.delete(uploaded.id)
try:
    client.files.retrieve(uploaded.id)
    after_delete = None
except openai.NotFoundError as e:
    after_delete = e.status_code

print(json.dumps({
    "batch_id": batch.id,
    "status": batch.status,
    "seen": sorted(seen),
    "counts": batch.request_counts.model_dump(),
    "metadata": batch.metadata,
    "completed_at": batch.completed_at,
    "output_custom_ids": [l["custom_id"] for l in out_lines],
    "output_statuses": sorted({l["response"]["status_code"] for l in out_lines}),
    "output_request_ids": [l["response"]["request_id"] for l in out_lines],
    "output_first_body": out_lines[0]["response"]["body"] if out_lines else None,
    "error_lines": err_lines,
    "listed": batch.id in listed,
    "file_listed": uploaded.id in files,
    "missing": missing,
    "cancel_finished": cancel_finished,
    "deleted": deleted.deleted,
    "after_delete": after_delete,
}))
