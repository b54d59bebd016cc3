-- wrk script: GET a path spread over many ids, with a bearer token.
-- Args: <path template with one %d> <number of ids> [rate req/s] [connections]. Env: BENCH_TOKEN.
-- Each request picks a uniformly random id in [0, ids); prints one RESULT line as deliver.lua.
-- Without a rate every connection sends its next request as soon as the last one is answered
-- (closed loop: the server's peak). With a rate, each connection waits an exponential
-- (Poisson) gap of mean connections/rate seconds after each answer before sending again, so
-- the connections together offer about `rate` requests/s (a little less: each connection
-- also waits for its answers); latency is still per request, send to full response.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

function init(args)
  template = args[1]
  ids = tonumber(args[2] or "1")
  headers = {["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "")}
  local rate = tonumber(args[3] or "0")
  local connections = tonumber(args[4] or "1")
  mean_gap_ms = rate > 0 and (connections * 1000.0 / rate) or 0
  non200 = 0
  math.randomseed(4242 + id)
end

function delay()
  if mean_gap_ms == 0 then return 0 end
  return -math.log(1 - math.random()) * mean_gap_ms
end

function request()
  local path = template
  if string.find(template, "%d", 1, true) then
    path = string.format(template, math.random(0, ids - 1))
  end
  return wrk.format("GET", path, headers)
end

function response(status, headers, body)
  if status ~= 200 then non200 = non200 + 1 end
end

function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + (thread:get("non200") or 0) end
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "non200": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, bad, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
