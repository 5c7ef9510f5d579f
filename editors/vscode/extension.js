// Starts `fpidsl lsp` for .fpi files. Highlighting works without it (syntaxes/fpi.tmLanguage.json); the server
// needs `npm install` in this folder (vscode-languageclient) and fpidsl installed with the lsp extra.
"use strict";
const vscode = require("vscode");

let client;

function activate(context) {
  const command = vscode.workspace.getConfiguration("fpidsl").get("server.command", ["fpidsl", "lsp"]);
  if (!Array.isArray(command) || command.length === 0) {
    return;
  }
  let languageclient;
  try {
    languageclient = require("vscode-languageclient/node");
  } catch (err) {
    vscode.window.showWarningMessage(
      "fpidsl: run `npm install` in the extension folder to enable the language server (highlighting works without it).");
    return;
  }
  const server = { command: command[0], args: command.slice(1), transport: languageclient.TransportKind.stdio };
  client = new languageclient.LanguageClient(
    "fpidsl", "fpidsl language server", server,
    { documentSelector: [{ scheme: "file", language: "fpi" }, { scheme: "untitled", language: "fpi" }] });
  client.start();
  context.subscriptions.push({ dispose: () => client && client.stop() });
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
