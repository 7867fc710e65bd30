// Newline framing of the sidecar's stdout: chunks in, whole lines out.
//
// A pipe delivers a frame in as many chunks as it likes and several frames in one chunk; a line
// is decoded only once it is whole, so a multi-byte UTF-8 character split between chunks survives.

export class LineSplitter {
  private partial: Buffer[] = [];

  /** The lines that `chunk` completes, without their `\n` (nor a `\r` before it). */
  *feed(chunk: Buffer): Generator<string> {
    let start = 0;
    for (let end = chunk.indexOf(10); end !== -1; end = chunk.indexOf(10, start)) {
      const tail = chunk.subarray(start, end);
      const line = this.partial.length === 0 ? tail : Buffer.concat([...this.partial, tail]);
      this.partial = [];
      start = end + 1;
      const text = line.toString("utf8");
      yield text.endsWith("\r") ? text.slice(0, -1) : text;
    }
    if (start < chunk.length) this.partial.push(chunk.subarray(start));
  }
}
