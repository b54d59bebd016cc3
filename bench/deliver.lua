-- wrk script: every thread sends its share of a file of signed Stripe deliveries once each,
-- then stops (the runner sends wrk SIGINT when all are done). File: records "<Stripe-Signature>\1<body>\0". Args: <file> [rate events/s]
-- With a rate, requests are spaced by exponential (Poisson) gaps of connections/rate seconds.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

function init(args)
  local nthreads = #threads  -- 0 inside a thread; wrk passes the count via the env instead
  nthreads = tonumber(os.getenv("WRK_THREADS") or "1")
  local connections = tonumber(os.getenv("WRK_CONNECTIONS") or "1")
  local file = assert(io.open(args[1], "rb"))
  local data = file:read("*a")
  file:close()
  rate = tonumber(args[2] or "0")
  mean_gap_ms = rate > 0 and (connections * 1000.0 / rate / nthreads) or 0
  requests_list = {}
  local pos, index = 1, 0
  while pos <= #data do
    local sep = string.find(data, "\1", pos, true)
    local stop = string.find(data, "\0", sep, true)
    if index % nthreads == id then
      local signature = string.sub(data, pos, sep - 1)
      local body = string.sub(data, sep + 1, stop - 1)
      table.insert(requests_list, wrk.format("POST", "/webhooks/stripe", {
        ["Content-Type"] = "application/json; charset=utf-8",
        ["Stripe-Signature"] = signature,
        ["User-Agent"] = "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
      }, body))
    end
    index = index + 1
    pos = stop + 1
  end
  sent, answered, non200 = 0, 0, 0
  math.randomseed(1000 + id)
end

function delay()
  if mean_gap_ms == 0 then return 0 end
  return -math.log(1 - math.random()) * mean_gap_ms
end

function request()
  sent = sent + 1
  -- past the end of its share a connection resends one already sent (a late duplicate)
  return requests_list[((sent - 1) % #requests_list) + 1]
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 200 then non200 = non200 + 1 end
  if answered == #requests_list then
    -- wrk's main thread sleeps for the whole -d duration; the runner interrupts it (SIGINT)
    -- once every thread has said it is done, which ends the run there.
    io.stderr:write("THREAD_DONE\n")
    io.stderr:flush()
    wrk.thread:stop()
  end
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
