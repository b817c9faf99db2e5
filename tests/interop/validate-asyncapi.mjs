// Validate an AsyncAPI document with the AsyncAPI initiative's own parser.
// Usage: node validate-asyncapi.mjs ../../docs/asyncapi.yaml   (exit 1 on any error)
import { readFile } from 'node:fs/promises';
import { Parser } from '@asyncapi/parser';

const path = process.argv[2];
if (!path) {
  console.error('usage: node validate-asyncapi.mjs <asyncapi.yaml>');
  process.exit(2);
}
const parser = new Parser();
const { document, diagnostics } = await parser.parse(await readFile(path, 'utf8'));
// Severity 0 is an error, 1 a warning, 2 and 3 hints.
const errors = diagnostics.filter((d) => d.severity === 0);
const warnings = diagnostics.filter((d) => d.severity === 1);
for (const d of [...errors, ...warnings]) {
  const where = d.path.join('.');
  console.error(`${d.severity === 0 ? 'error' : 'warning'} ${d.code} at ${where}: ${d.message}`);
}
if (errors.length > 0 || document === undefined) {
  console.error(`${path}: ${errors.length} errors`);
  process.exit(1);
}
const channels = document.channels().length;
const messages = document.components().messages().length;
console.log(`${path}: valid AsyncAPI ${document.version()}, ${channels} channels, ${messages} messages, ${warnings.length} warnings`);
