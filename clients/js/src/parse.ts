/**
 * Incremental parsers for the two streaming framings Streamgate speaks over plain HTTP:
 * Server-Sent Events (as the HTML standard parses them) and newline-delimited JSON envelopes.
 *
 * Both take decoded text in arbitrary chunks (a chunk may end in the middle of a line, or
 * between the `\r` and `\n` of a CRLF) and report whole frames only. A frame cut off by the end
 * of the connection is never reported, so its id never becomes the resume position.
 */

/** One frame as it came off the wire, before JSON decoding. */
export interface RawFrame {
  /** SSE `event:` name (`message` when absent) or the envelope's `event`. */
  event: string;
  /** SSE `data:` lines joined with `\n`, or the envelope's `data` re-encoded. */
  data: string;
  /**
   * The last event id after this frame, as the SSE standard defines it: it persists across
   * frames without an `id:` line and an empty `id:` line resets it to `""`.
   */
  lastEventId: string;
  /** Whether this frame itself carried an `id` (SSE line or envelope field). */
  hasId: boolean;
  /** Multi-stream NDJSON envelopes name their stream. */
  stream?: string;
  /** NDJSON only: `data` already decoded (then `data` above is empty). */
  decoded?: { value: unknown };
}

/** Callbacks of a parser. */
export interface ParserSink {
  /** A complete frame. */
  frame(frame: RawFrame): void;
  /** SSE `retry:` (milliseconds) or nothing. */
  retry?(ms: number): void;
}

/** Splits text into lines on LF, CRLF or CR, across chunk boundaries. */
class LineSplitter {
  private buffer = "";
  /** A chunk ended with `\r`: a `\n` starting the next chunk belongs to it. */
  private pendingCr = false;

  /** Feeds a chunk; calls `line` for each complete line (without its terminator). */
  push(text: string, line: (l: string) => void): void {
    let start = 0;
    if (this.pendingCr && text.startsWith("\n")) start = 1;
    this.pendingCr = false;
    for (let i = start; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c === 10 || c === 13) {
        line(this.buffer + text.slice(start, i));
        this.buffer = "";
        if (c === 13) {
          if (i + 1 === text.length) this.pendingCr = true;
          else if (text.charCodeAt(i + 1) === 10) i++;
        }
        start = i + 1;
      }
    }
    this.buffer += text.slice(start);
  }
}

/**
 * The SSE parser of the HTML standard (§9.2.6), minus the browser parts: fields `event`,
 * `data`, `id`, `retry`; comments (`:`) are activity only; an id containing NUL is ignored.
 */
export class SseParser {
  private lines = new LineSplitter();
  private event = "";
  private data: string[] = [];
  private sawId = false;
  private idBuffer: string;
  private first = true;

  /** `lastEventId`: the position this connection resumed from (the id buffer's start). */
  constructor(
    private sink: ParserSink,
    lastEventId = "",
  ) {
    this.idBuffer = lastEventId;
  }

  /** Feeds decoded text. */
  push(text: string): void {
    if (this.first && text.length > 0) {
      this.first = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    this.lines.push(text, (line) => this.line(line));
  }

  private line(line: string): void {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "event":
        this.event = value;
        break;
      case "data":
        this.data.push(value);
        break;
      case "id":
        if (!value.includes("\0")) {
          this.idBuffer = value;
          this.sawId = true;
        }
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.sink.retry?.(Number(value));
        break;
      default:
        break;
    }
  }

  private dispatch(): void {
    const hadData = this.data.length > 0;
    const frame: RawFrame = {
      event: this.event || "message",
      data: this.data.join("\n"),
      lastEventId: this.idBuffer,
      hasId: this.sawId,
    };
    this.event = "";
    this.data = [];
    this.sawId = false;
    // The standard dispatches nothing without data, but the id still takes effect: report it
    // as a frame the caller can recognise (an empty `id:` alone resets the position).
    if (hadData) this.sink.frame(frame);
    else if (frame.hasId) this.sink.frame({ ...frame, event: "", data: "" });
  }
}

/**
 * NDJSON envelopes (`{"event":…,"id":…,"data":…}` per line; an empty line is a keep-alive).
 * A line that is not a JSON object is reported as an `error` frame with code `bad_frame`.
 */
export class NdjsonParser {
  private lines = new LineSplitter();

  constructor(
    private sink: ParserSink,
    private lastEventId = "",
  ) {}

  /** Feeds decoded text. */
  push(text: string): void {
    this.lines.push(text, (line) => this.line(line));
  }

  private line(line: string): void {
    if (line.trim() === "") return;
    let envelope: unknown;
    try {
      envelope = JSON.parse(line);
    } catch {
      envelope = undefined;
    }
    if (envelope === null || typeof envelope !== "object" || Array.isArray(envelope)) {
      this.sink.frame({
        event: "error",
        data: JSON.stringify({ code: "bad_frame", message: "not a JSON envelope", line: line.slice(0, 200) }),
        lastEventId: this.lastEventId,
        hasId: false,
      });
      return;
    }
    const env = envelope as Record<string, unknown>;
    const hasId = typeof env.id === "string";
    if (hasId) this.lastEventId = env.id as string;
    this.sink.frame({
      event: typeof env.event === "string" ? env.event : "change",
      data: "",
      lastEventId: this.lastEventId,
      hasId,
      stream: typeof env.stream === "string" ? env.stream : undefined,
      // `enveloped=false` lines are the bare change document.
      decoded: { value: "event" in env ? (env.data ?? null) : env },
    });
  }
}
