-- wrk script for bench/ingest: POST the tokens of a file (one per line) in order, count the answers,
-- print one JSON line of results.
-- Usage: wrk -t1 -c32 -d5s -s ingest.lua URL -- TOKENS_FILE LIMIT once|cycle
-- `once` sends each token at most once and stops when they run out (the run's length is then measured
-- here, since wrk itself always reports the full -d); `cycle` starts over (for the bare app).
local ffi = require("ffi")
ffi.cdef[[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local function now_us()
  local ts = ffi.new("bench_timespec")
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local limit = tonumber(args[2]) or math.huge
  cycle = args[3] == "cycle"
  requests_ = {}
  for line in io.lines(args[1]) do
    if #requests_ >= limit then break end
    requests_[#requests_ + 1] = wrk.format("POST", "/callbacks/intergiro",
      {["Content-Type"] = "application/jwt"}, line)
  end
  index = 0
  accepted = 0
  other = 0
  failed = 0
  exhausted = 0
  started_us = now_us()
  stopped_us = 0
end

function request()
  index = index + 1
  if index > #requests_ then
    if cycle then
      index = 1
    else
      exhausted = 1
      index = #requests_ + 1
      return requests_[#requests_]
    end
  end
  return requests_[index]
end

function response(status, headers, body)
  if status == 200 then
    if string.find(body, '"accepted"', 1, true) then accepted = accepted + 1 else other = other + 1 end
  else
    failed = failed + 1
  end
  if exhausted == 1 and stopped_us == 0 then
    stopped_us = now_us()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local accepted_, other_, failed_, exhausted_, sent_ = 0, 0, 0, 0, 0
  local duration_us = summary.duration
  for _, thread in ipairs(threads) do
    accepted_ = accepted_ + thread:get("accepted")
    other_ = other_ + thread:get("other")
    failed_ = failed_ + thread:get("failed")
    exhausted_ = exhausted_ + thread:get("exhausted")
    sent_ = sent_ + thread:get("index")
    local stopped = thread:get("stopped_us")
    if stopped > 0 then duration_us = stopped - thread:get("started_us") end
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "accepted": %d, ' ..
    '"other_200": %d, "failed": %d, "socket_errors": %d, "exhausted": %d, "sent": %d}\n',
    summary.requests, duration_us, latency:percentile(50), latency:percentile(99),
    accepted_, other_, failed_, errors.connect + errors.read + errors.write + errors.timeout, exhausted_,
    sent_))
end
