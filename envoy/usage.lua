-- envoy/usage.lua: runs inside Envoy (envoy.filters.http.lua), not in Redis.
--
-- On the response: picks out the parts of an OpenAI-compatible reply that carry the model
-- and the usage, as the reply passes (never holding a chunk back, never holding the reply),
-- and leaves them in the request's dynamic metadata, namespace "kt.usage":
--   json  {"model": ..., "usage": ...}: the top-level "model" and "usage" values of a
--         JSON reply of any size, copied verbatim;
--   sse   "data: ...\n\n" lines of an event stream: the first line that names a model
--         and the lines whose "usage" is not null (the first and the latest, at most 8).
--         A line over MAX_LINE (an OpenAI responses "response.completed" event carries
--         the whole output) is read by the same streaming selector as a JSON reply and
--         kept reduced to its type, model and usage members (and those of its
--         "response" or "message" object), verbatim.
-- Envoy's gRPC access log carries the metadata to the sidecar (sidecar/transports/als.py),
-- which reads it with the same parser ext_proc uses (sidecar/settlement/usage.py): this script only
-- selects bytes, it never interprets a number, so there is one implementation of what
-- usage means.
--
-- On the request: a streamed chat completion ("stream": true) carries its usage only when
-- it asks for it, so "stream_options": {"include_usage": true} is added to the body
-- (after a client's own stream_options members: the last of a repeated key is the one
-- JSON parsers keep) and Content-Length set (a body sent chunked is whole here too).
-- Nothing else of the body changes. This filter comes before ext_authz (why: see
-- sidecar/envoy_config.py, _usage_lua).
-- The decision reads only the first DECIDED_BYTES of a body (ext_authz's max_request_bytes),
-- so of a larger body this filter reads what the bound of a reply whose usage cannot be
-- read needs (sidecar/settlement/bound.py): the top-level n, best_of, max_tokens,
-- max_completion_tokens, max_output_tokens, previous_response_id and conversation, each the
-- last of a repeated key (what JSON parsers keep) with its key unescaped as a provider
-- reads it, and leaves them verbatim in the metadata ("request": a JSON object; a value
-- over MAX_VALUE as "?", which the sidecar counts at its most). A streamed chat body is
-- buffered for the rewrite anyway; any other is read chunk by chunk as it passes (never
-- held, never delayed), by the same streaming selector as a reply.
--
-- Why selection is safe without a full JSON parser: inside a JSON string every quote is
-- escaped, so the bytes "usage" (quote, usage, quote) occur only as a key or as the
-- whole string value "usage"; a line kept by mistake is harmless (the parser decides),
-- and the JSON body's keys are found by a scan that skips strings and nested values.
-- Bounds, per request: the unfinished line (MAX_LINE) and the chunk in hand, the kept lines
-- (MAX_USAGE_LINES + 1 of at most MAX_LINE, and their copy in the metadata), the selected
-- values (MAX_VALUE each), a key being read (MAX_KEY): about 300 KiB at worst, never the
-- reply. Of a request: a streamed chat body, which Envoy buffers for the rewrite anyway
-- (within its buffer limit), and of any other only the chunk in hand and the seven
-- selected values. A value over MAX_VALUE
-- is not kept (its reservation stands, docs/usage.md).

local MAX_LINE = 16 * 1024
-- a selected value (a usage object is a few hundred bytes): seven of them and their keys
-- keep a reduced line under MAX_LINE
local MAX_VALUE = 2 * 1024
-- usage lines kept per stream: OpenAI sends one, Anthropic a message_start and a few
-- cumulative message_delta (all kept up to this many; beyond it the first and the latest)
local MAX_USAGE_LINES = 8
local NS = "kt.usage"
-- the part of a body the decision reads whole (kt envoy-config sets ext_authz's
-- max_request_bytes here): a body over it is read here for the bound
local DECIDED_BYTES = 65536
-- the top-level request fields the bound reads (sidecar/settlement/bound.py, _BodySeen), in order
local REQUEST_KEYS = {"n", "best_of", "max_tokens", "max_completion_tokens",
                      "max_output_tokens", "previous_response_id", "conversation"}
local REQUEST_PATHS = {}
for _, k in ipairs(REQUEST_KEYS) do REQUEST_PATHS[k] = true end
-- the endpoints whose streams carry usage only when asked for it
local STREAM_USAGE_PATHS = {["/v1/chat/completions"] = true, ["/v1/completions"] = true}

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

-- a key as JSON parsers read it: a client may spell "stream" as "str\u0065am", which the
-- provider reads as "stream" (only ASCII matters for the keys compared here)
local SIMPLE_ESCAPES = {['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f',
                       n = '\n', r = '\r', t = '\t'}
local function json_key(raw)
  if string.find(raw, "\\", 1, true) == nil then return raw end
  local out, i = {}, 1
  while i <= #raw do
    local k = string.find(raw, "\\", i, true)
    if k == nil then
      out[#out + 1] = string.sub(raw, i)
      break
    end
    out[#out + 1] = string.sub(raw, i, k - 1)
    local c = string.sub(raw, k + 1, k + 1)
    if c == "u" then
      local code = tonumber(string.sub(raw, k + 2, k + 5), 16)
      out[#out + 1] = (code ~= nil and code < 128) and string.char(code) or "?"
      i = k + 6
    else
      out[#out + 1] = SIMPLE_ESCAPES[c] or "?"
      i = k + 2
    end
  end
  return table.concat(out)
end

-- the members of the JSON object whose "{" is at index i, as {key, value start, value
-- end (exclusive)}, and the index of its closing "}"; nil when the text is not such an object
local function members(s, i)
  local out = {}
  i = i + 1
  while true do
    i = string.find(s, '%S', i)
    if i == nil then return nil end
    local c = string.byte(s, i)
    if c == 125 then return out, i end
    if #out > 0 then
      if c ~= 44 then return nil end
      i = string.find(s, '%S', i + 1)
      if i == nil then return nil end
      c = string.byte(s, i)
    end
    if c ~= 34 then return nil end
    local key_end = skip_string(s, i)
    if key_end == nil then return nil end
    local key = json_key(string.sub(s, i + 1, key_end - 2))
    i = string.find(s, '%S', key_end)
    if i == nil or string.byte(s, i) ~= 58 then return nil end
    i = string.find(s, '%S', i + 1)
    if i == nil then return nil end
    local value_end = skip_value(s, i)
    if value_end == nil then return nil end
    out[#out + 1] = {key, i, value_end}
    i = value_end
  end
end

-- the last member named `key`, and its raw value
local function last_member(ms, key)
  local found
  for _, m in ipairs(ms) do
    if m[1] == key then found = m end
  end
  return found
end

-- the body with stream_options.include_usage set to true, or nil when it needs no change
-- (not a streamed request, already asked, or not a JSON object the provider would take)
local function with_stream_usage(s)
  local open = string.find(s, '%S')
  if open == nil or string.byte(s, open) ~= 123 then return nil end
  local ms, close = members(s, open)
  if ms == nil then return nil end
  local stream = last_member(ms, "stream")
  if stream == nil or string.sub(s, stream[2], stream[3] - 1) ~= "true" then return nil end
  local opts = last_member(ms, "stream_options")
  local value = opts and string.sub(s, opts[2], opts[3] - 1)
  if value == nil or value == "null" then
    return string.sub(s, 1, close - 1) .. ',"stream_options":{"include_usage":true}'
        .. string.sub(s, close)
  end
  if string.byte(value, 1) ~= 123 then return nil end
  local inner, inner_close = members(s, opts[2])
  if inner == nil then return nil end
  local asked = last_member(inner, "include_usage")
  if asked ~= nil and string.sub(s, asked[2], asked[3] - 1) == "true" then return nil end
  return string.sub(s, 1, inner_close - 1) .. (#inner > 0 and "," or "")
      .. '"include_usage":true' .. string.sub(s, inner_close)
end

-- A streaming selector: fed a JSON document in pieces of any size, it keeps the raw text
-- of the values at the wanted paths ("usage", "response.usage": members of the top-level
-- object and of the objects directly under it), at most MAX_VALUE bytes each, and nothing
-- else: the document itself is never held. The scan skips strings (so a "usage" inside
-- generated text is never a key) and counts depth (so a nested "usage" is not taken). A
-- value ends at its parent's next "," or "}", which takes every kind of value alike.
-- `last` (a request body): a repeated key's last value counts (its earlier one is dropped
-- when it starts), blanks are not kept, and a value over MAX_VALUE is named in `over`.
local function selector(wanted, last)
  return {wanted = wanted, depth = 0, stack = {}, instr = false, bs = 0,
          key = nil, cap = nil, found = {}, last = last, over = {}}
end

local function cap_add(sel, piece)
  local cap = sel.cap
  if sel.last then piece = (string.gsub(piece, "%s+", "")) end
  cap.size = cap.size + #piece
  if cap.size > MAX_VALUE then
    sel.cap = nil  -- too long to be usage: not kept
    if sel.last then sel.over[cap.path] = true end
  else
    cap.parts[#cap.parts + 1] = piece
  end
end

-- a key's text so far: no key read is longer than MAX_KEY (a longer one is named ""),
-- so a client's megabyte key is never held; room for every wanted key spelled wholly
-- with \uXXXX escapes ("max_completion_tokens": 21 x 6 bytes)
local MAX_KEY = 160

local function key_add(sel, piece)
  sel.key_size = sel.key_size + #piece
  if sel.key_size <= MAX_KEY then sel.key[#sel.key + 1] = piece end
end

local function select_feed(sel, data)
  local i, n = 1, #data
  local cap_from = 1
  while i <= n do
    if sel.instr then
      -- the next quote ends the string unless an odd run of backslashes precedes it: one
      -- plain search per quote, not a step per escape (generated text is full of \n)
      local k = string.find(data, '"', i, true)
      local j = (k or n + 1) - 1
      while j >= i and string.byte(data, j) == 92 do j = j - 1 end
      local run = (k or n + 1) - 1 - j
      if j < i then run = run + sel.bs end  -- the run goes on from the previous piece
      if k == nil then
        if sel.key ~= nil then key_add(sel, string.sub(data, i)) end
        sel.bs = run % 2
        break
      end
      sel.bs = 0
      if run % 2 == 1 then  -- an escaped quote: still inside the string
        if sel.key ~= nil then key_add(sel, string.sub(data, i, k)) end
      else
        sel.instr = false
        if sel.key ~= nil then
          key_add(sel, string.sub(data, i, k - 1))
          local key = sel.key_size <= MAX_KEY and json_key(table.concat(sel.key)) or ""
          sel.key = nil
          local top = sel.stack[sel.depth]
          top.key = #key <= MAX_KEY and key or ""
        end
      end
      i = k + 1
    else
      local k = string.find(data, '[{}%[%]",:]', i)
      if k == nil then break end
      local c = string.byte(data, k)
      local top = sel.stack[sel.depth]
      if c == 34 then
        sel.instr = true
        if top ~= nil and top.obj and top.expect_key and sel.depth <= 2 then
          sel.key, sel.key_size = {}, 0
        end
      elseif c == 58 then  -- ":" after a key: the value starts
        if top ~= nil and top.obj then
          top.expect_key = false
          local path = top.key
          if sel.depth == 2 then path = (sel.stack[1].key or "") .. "." .. (path or "") end
          if sel.depth <= 2 and path ~= nil and sel.wanted[path] and sel.cap == nil then
            sel.cap = {path = path, depth = sel.depth, parts = {}, size = 0}
            cap_from = k + 1
            if sel.last then
              sel.found[path] = nil
              sel.over[path] = nil
            end
          end
        end
      elseif c == 44 or c == 125 or c == 93 then  -- "," "}" "]"
        local cap = sel.cap
        if cap ~= nil and cap.depth == sel.depth and c ~= 93 then
          cap_add(sel, string.sub(data, cap_from, k - 1))
          if sel.cap ~= nil then sel.found[cap.path] = table.concat(cap.parts) end
          sel.cap = nil
        end
        if c == 44 then
          if top ~= nil and top.obj then top.expect_key = true end
        else
          if sel.depth <= 2 then sel.stack[sel.depth] = nil end
          sel.depth = sel.depth - 1
        end
      else  -- "{" or "["
        sel.depth = sel.depth + 1
        -- only the two levels a wanted path can be in get a frame: deeper nesting is a
        -- count, so a body of a million "[" costs no memory (no table per level)
        if sel.depth <= 2 then
          sel.stack[sel.depth] = {obj = c == 123, expect_key = c == 123}
        end
      end
      i = k + 1
    end
  end
  if sel.cap ~= nil and cap_from <= n then cap_add(sel, string.sub(data, cap_from)) end
end

local function is_object(text)
  return text ~= nil and string.find(text, '^%s*{') ~= nil
end

-- what the bound reads of a whole body, left in the metadata (sidecar/settlement/bound.py)
-- (a stored conversation's id only as present: true; null is the API's "none")
local PRESENCE_KEYS = {previous_response_id = true, conversation = true}

local function report_body(handle, sel)
  local out = {}
  for _, k in ipairs(REQUEST_KEYS) do
    local v = sel.found[k]
    if sel.over[k] then v = '"?"' end
    if v ~= nil and PRESENCE_KEYS[k] then v = v ~= "null" and "true" or nil end
    if v ~= nil and v ~= "" then out[#out + 1] = '"' .. k .. '":' .. v end
  end
  handle:streamInfo():dynamicMetadata():set(NS, "request", "{" .. table.concat(out, ",") .. "}")
end

-- a body the decision does not read whole, not buffered here: read as it passes
local function read_large_body(handle, headers)
  local length = tonumber(headers:get("content-length") or "")
  if length ~= nil and length <= DECIDED_BYTES then return end
  local sel, size = selector(REQUEST_PATHS, true), 0
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      size = size + n
      select_feed(sel, chunk:getBytes(0, n))
    end
  end
  if size > DECIDED_BYTES then report_body(handle, sel) end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(":method") ~= "POST" then return end
  local path = headers:get(":path") or ""
  local q = string.find(path, "?", 1, true)
  if q ~= nil then path = string.sub(path, 1, q - 1) end
  if not STREAM_USAGE_PATHS[path] then
    read_large_body(handle, headers)
    return
  end
  local body = handle:body()
  if body == nil then return end
  local n = body:length()
  if n == 0 then return end
  local s = body:getBytes(0, n)
  local out
  -- most requests: one scan (a key spelled with escapes is looked at in full)
  if string.find(s, '"stream"', 1, true) ~= nil or string.find(s, "\\u", 1, true) ~= nil then
    out = with_stream_usage(s)
  end
  -- what the decision gets is the body as rewritten: one the rewrite takes over
  -- DECIDED_BYTES may reach it in part (Envoy 1.40 passes it whole, as it comes in one
  -- piece; reported anyway: both views of a whole body agree)
  if (out ~= nil and #out or n) > DECIDED_BYTES then
    local sel = selector(REQUEST_PATHS, true)
    select_feed(sel, s)
    report_body(handle, sel)
  end
  if out == nil then return end
  body:setBytes(out)
  -- fetched anew: Envoy's wrappers do not outlive the yield for the body. The whole body
  -- is here, so its length is known even when the client sent it chunked
  handle:headers():replace("content-length", tostring(#out))
end

local JSON_PATHS = {model = true, usage = true}

local function json_reply(handle)
  local sel = selector(JSON_PATHS)
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then select_feed(sel, chunk:getBytes(0, n)) end
  end
  local usage, model = sel.found.usage, sel.found.model
  if not is_object(usage) then return end
  local doc = '{"usage":' .. usage
  if model ~= nil then doc = doc .. ',"model":' .. model end
  handle:streamInfo():dynamicMetadata():set(NS, "json", doc .. "}")
end

-- what an event line over MAX_LINE is reduced to: the members the usage parser reads
-- (sidecar/settlement/usage.py: type, model, usage, and the model and usage of OpenAI responses'
-- "response" and Anthropic's "message"), copied verbatim into a document of the same shape
local LINE_PATHS = {type = true, model = true, usage = true,
                    ["response.model"] = true, ["response.usage"] = true,
                    ["message.model"] = true, ["message.usage"] = true}

-- the reduced "data:" line, and whether it carries a usage object
local function reduced_line(sel)
  local f = sel.found
  local out = {}
  for _, k in ipairs({"type", "model", "usage"}) do
    if f[k] ~= nil then out[#out + 1] = '"' .. k .. '":' .. f[k] end
  end
  for _, inner in ipairs({"response", "message"}) do
    local parts = {}
    for _, k in ipairs({"model", "usage"}) do
      local v = f[inner .. "." .. k]
      if v ~= nil then parts[#parts + 1] = '"' .. k .. '":' .. v end
    end
    if #parts > 0 then out[#out + 1] = '"' .. inner .. '":{' .. table.concat(parts, ",") .. "}" end
  end
  local usage = is_object(f.usage) or is_object(f["response.usage"])
      or is_object(f["message.usage"])
  return "data: {" .. table.concat(out, ",") .. "}\n\n", usage
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
  local tail = ""  -- the unfinished last line of what came so far (at most MAX_LINE)
  local long  -- while inside a line over MAX_LINE: its selector (false: not a data line)
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
  local function add_usage_line(l)
    if #usage_lines >= MAX_USAGE_LINES then table.remove(usage_lines, 2) end
    usage_lines[#usage_lines + 1] = l
  end
  -- a line over MAX_LINE, read whole by a selector: kept reduced to what the parser reads
  local function reduced(sel)
    local l, has_usage = reduced_line(sel)
    if has_usage then add_usage_line(l) end
    local f = sel.found
    if model_line == nil and (f.model or f["response.model"] or f["message.model"]) then
      model_line = l
    end
    if has_usage then publish() end
  end
  local function start_long(first_part)
    if string.sub(first_part, 1, 5) ~= "data:" then return false end
    local sel = selector(LINE_PATHS)
    select_feed(sel, string.sub(first_part, 6))
    return sel
  end
  local function keep(data, first, last)
    local l = string.sub(data, first, last)
    if string.sub(l, 1, 5) ~= "data:" then return nil end
    if #l > MAX_LINE then
      reduced(start_long(l))
      return nil
    end
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
          add_usage_line(l)
          changed = true
        end
        from = (last or #data) + 1
      end
    end
    -- published as soon as usage is seen: a stream cut after its usage chunk still settles
    if changed and #usage_lines > 0 then publish() end
    if final then return "" end
    local rest
    if cut ~= nil then
      rest = string.sub(data, cut)
    else
      -- keep the unfinished last line: a key may straddle two chunks (one anchored match:
      -- ".*" runs to the end and backs up to the last newline)
      local after = string.match(data, "^.*\n()")
      rest = after and string.sub(data, after) or data
    end
    if #rest > MAX_LINE then
      -- a line this long is read on by a selector, chunk by chunk, never held
      long = start_long(rest)
      return ""
    end
    return rest
  end
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      local data = chunk:getBytes(0, n)
      if long ~= nil then
        local nl = string.find(data, "\n", 1, true)
        if long then select_feed(long, nl and string.sub(data, 1, nl - 1) or data) end
        if nl ~= nil then
          if long then reduced(long) end
          long = nil
          data = string.sub(data, nl + 1)
        else
          data = ""
        end
      end
      if #data > 0 then
        if #tail > 0 then data = tail .. data end
        tail = scan(data, false)
      end
    end
  end
  if long then reduced(long) end
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
