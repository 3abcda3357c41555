-- envoy_usage.lua: runs inside Envoy (envoy.filters.http.lua), not in Redis.
--
-- Picks out the parts of an OpenAI-compatible response that carry the model and the
-- usage, as the response passes (never holding a chunk back), and leaves them in the
-- request's dynamic metadata, namespace "kt.usage":
--   json  {"model": ..., "usage": ...}: the top-level "model" and "usage" values of a
--         buffered JSON reply, copied verbatim;
--   sse   "data: ...\n\n" lines of an event stream: the first line that names a model
--         and the lines whose "usage" is not null (the first and the latest, at most 8).
-- Envoy's gRPC access log carries the metadata to the sidecar (sidecar/transports/als.py),
-- which reads it with the same parser ext_proc uses (sidecar/usage.py): this script only
-- selects bytes, it never interprets a number, so there is one implementation of what
-- usage means.
--
-- Why selection is safe without a full JSON parser: inside a JSON string every quote is
-- escaped, so the bytes "usage" (quote, usage, quote) occur only as a key or as the
-- whole string value "usage"; a line kept by mistake is harmless (the parser decides),
-- and the JSON body's keys are found by a scan that skips strings and nested values.
-- Bounds: a JSON reply over MAX_JSON bytes, or an SSE line over MAX_LINE, is not kept
-- (its reservation stands, as in ext_proc).

local MAX_JSON = 4 * 1024 * 1024
local MAX_LINE = 16 * 1024
-- usage lines kept per stream: OpenAI sends one, Anthropic a message_start and a few
-- cumulative message_delta (all kept up to this many; beyond it the first and the latest)
local MAX_USAGE_LINES = 8
local NS = "kt.usage"

-- index just past the JSON string that opens at i, or nil
local function skip_string(s, i)
  local j = i + 1
  while true do
    local k = string.find(s, '["\\]', j)
    if k == nil then return nil end
    if string.byte(s, k) == 92 then j = k + 2 else return k + 1 end
  end
end

-- index just past the JSON value that starts at i (no leading blanks), or nil
local function skip_value(s, i)
  local c = string.byte(s, i)
  if c == 34 then return skip_string(s, i) end
  if c == 123 or c == 91 then
    local depth, j = 0, i
    while true do
      local k = string.find(s, '[%[%]{}"]', j)
      if k == nil then return nil end
      local b = string.byte(s, k)
      if b == 34 then
        j = skip_string(s, k)
        if j == nil then return nil end
      else
        if b == 123 or b == 91 then depth = depth + 1 else depth = depth - 1 end
        j = k + 1
        if depth == 0 then return j end
      end
    end
  end
  local k = string.find(s, '[,}%]%s]', i)
  return k or (#s + 1)
end

-- the raw text of the top-level "model" and "usage" values of a JSON object
local function top_level(s)
  local i = string.find(s, '%S')
  if i == nil or string.byte(s, i) ~= 123 then return nil, nil end
  local model, usage
  i = i + 1
  while true do
    i = string.find(s, '%S', i)
    if i == nil then break end
    local c = string.byte(s, i)
    if c == 44 then
      i = string.find(s, '%S', i + 1)
      if i == nil then break end
      c = string.byte(s, i)
    end
    if c ~= 34 then break end
    local key_end = skip_string(s, i)
    if key_end == nil then break end
    local key = string.sub(s, i + 1, key_end - 2)
    i = string.find(s, '%S', key_end)
    if i == nil or string.byte(s, i) ~= 58 then break end
    i = string.find(s, '%S', i + 1)
    if i == nil then break end
    local value_end = skip_value(s, i)
    if value_end == nil then break end
    if key == "model" then
      model = string.sub(s, i, value_end - 1)
    elseif key == "usage" then
      usage = string.sub(s, i, value_end - 1)
    end
    i = value_end
  end
  return model, usage
end

local function json_reply(handle)
  local parts, size = {}, 0
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 and size <= MAX_JSON then
      size = size + n
      if size <= MAX_JSON then parts[#parts + 1] = chunk:getBytes(0, n) end
    end
  end
  if size == 0 or size > MAX_JSON then return end
  local model, usage = top_level(table.concat(parts))
  if usage == nil then return end
  local doc = '{"usage":' .. usage
  if model ~= nil then doc = doc .. ',"model":' .. model end
  handle:streamInfo():dynamicMetadata():set(NS, "json", doc .. "}")
end

-- the line of `data` that holds position `at`: start index, end index (before its
-- newline), or nil when the line is not complete yet
local function line_around(data, at)
  local first = at
  while first > 1 and string.byte(data, first - 1) ~= 10 do first = first - 1 end
  local nl = string.find(data, "\n", at, true)
  if nl == nil then return first, nil end
  local last = nl - 1
  if string.byte(data, last) == 13 then last = last - 1 end
  return first, last
end

local function sse_reply(handle)
  local tail = ""  -- the unfinished last line of what came so far
  local model_line
  local usage_lines = {}  -- the first, then the latest ones (at most MAX_USAGE_LINES)
  local function publish()
    local out = {}
    if model_line ~= nil then out[1] = model_line end
    for _, l in ipairs(usage_lines) do
      if l ~= model_line then out[#out + 1] = l end
    end
    -- fetched anew each time: Envoy's wrappers do not outlive a yield (between chunks)
    handle:streamInfo():dynamicMetadata():set(NS, "sse", table.concat(out))
  end
  local function keep(data, first, last)
    local l = string.sub(data, first, last)
    if string.sub(l, 1, 5) ~= "data:" or #l > MAX_LINE then return nil end
    return l .. "\n\n"
  end
  -- Per chunk, only what can matter is looked at: a usage object ("usage" then ":" then
  -- "{", which a null usage is not) and, until one is found, a "model" key; the lines
  -- around them are cut out. Most chunks (text deltas) cost one scan in C.
  local function scan(data, final)
    local changed, from, cut = false, 1, nil
    if model_line == nil then
      local at = string.find(data, '"model"', 1, true)
      if at ~= nil then
        local first, last = line_around(data, at)
        if last ~= nil or final then
          model_line = keep(data, first, last or #data)
          changed = model_line ~= nil
        else
          cut = first
        end
      end
    end
    while true do
      -- a plain search (memchr-fast in C), then one anchored look at what follows: a
      -- pattern search would try every position of every chunk
      local at = string.find(data, '"usage"', from, true)
      if at == nil then break end
      if string.find(data, '^%s*:%s*{', at + 7) == nil then
        -- null (or cut by the chunk's end: the tail keeps it for the next chunk)
        from = at + 7
      else
        local first, last = line_around(data, at)
        if last == nil and not final then
          if cut == nil or first < cut then cut = first end
          break
        end
        local l = keep(data, first, last or #data)
        if l ~= nil then
          if #usage_lines >= MAX_USAGE_LINES then table.remove(usage_lines, 2) end
          usage_lines[#usage_lines + 1] = l
          changed = true
        end
        from = (last or #data) + 1
      end
    end
    -- published as soon as usage is seen: a stream cut after its usage chunk still settles
    if changed and #usage_lines > 0 then publish() end
    if final then return "" end
    if cut ~= nil then return string.sub(data, cut) end
    -- keep the unfinished last line: a key may straddle two chunks (one anchored match:
    -- ".*" runs to the end and backs up to the last newline)
    local after = string.match(data, "^.*\n()")
    local rest = after and string.sub(data, after) or data
    if #rest > MAX_LINE then return "" end
    return rest
  end
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      local data = chunk:getBytes(0, n)
      if #tail > 0 then data = tail .. data end
      tail = scan(data, false)
    end
  end
  if #tail > 0 then scan(tail, true) end
end

function envoy_on_response(handle)
  local ct = handle:headers():get("content-type") or ""
  if string.find(ct, "text/event-stream", 1, true) then
    sse_reply(handle)
  else
    json_reply(handle)
  end
end
