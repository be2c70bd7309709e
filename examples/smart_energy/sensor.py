#!/usr/bin/env python3
"""Smart-energy sensor: sends meter readings to the gateway over mTLS with its TPM key.

The client certificate is the one attestd issued to the device's agent
(``client-cert.pem``); the private key is the agent's TPM-resident key
(``tls-key.pem``, a TSS2 PRIVATE KEY), usable only inside that TPM. Python's ssl
module loads it through OpenSSL's tpm2 provider; this program sets nothing up for
that itself. Run it with:

    OPENSSL_CONF=examples/smart_energy/openssl-tpm2.cnf    # default + tpm2 providers
    TPM2OPENSSL_TCTI=swtpm:host=127.0.0.1,port=2321        # or device:/dev/tpmrm0

    python examples/smart_energy/sensor.py --gateway 127.0.0.1:8443 \\
        --gateway-cert gateway-tls/gateway-cert.pem --agent-state /var/lib/attestd-agent

It prints what happens on stdout, one line each: ``connected``, ``admitted as ID``,
``refused: WHY``, ``closed by the gateway: WHY``, ``sent N readings``. Exit status:
0 after --count readings or on SIGTERM/SIGINT; 1 bad arguments or unusable key;
2 refused (TLS handshake or admission); 3 admitted, then closed by the gateway;
4 the gateway could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import ssl
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_CLOSED, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
MAX_LINE = 4096


def say(message: str) -> None:
    print(f"sensor: {message}", flush=True)


def client_context(args: argparse.Namespace) -> ssl.SSLContext:
    """TLS client: trusts only the gateway's certificate, presents the device's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(args.gateway_cert)
    try:
        ctx.load_cert_chain(args.cert, args.key)
    except (ssl.SSLError, OSError) as e:
        hint = ""
        with contextlib.suppress(OSError):
            tss2 = Path(args.key).read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY")
            if tss2 and not (os.environ.get("OPENSSL_CONF") and os.environ.get("TPM2OPENSSL_TCTI")):
                hint = (
                    "; the key lives in the TPM: set OPENSSL_CONF (e.g. "
                    "examples/smart_energy/openssl-tpm2.cnf) and TPM2OPENSSL_TCTI"
                )
        raise SystemExit(
            f"sensor: cannot use {args.cert} with {args.key}: {_reason(e)}{hint}"
        ) from None
    return ctx


async def listen(reader: asyncio.StreamReader) -> str:
    """Wait for the gateway to end the session; returns why it did."""
    while True:
        try:
            line = await reader.readline()
        except (ssl.SSLError, ConnectionError) as e:
            return f"connection lost ({_reason(e)})"
        except ValueError:
            return "the gateway sent a line too long"
        if not line:
            return "connection closed (no reason given)"
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and "closed" in message:
            return str(message["closed"])
        if isinstance(message, dict) and "error" in message:
            say(f"the gateway rejected a reading: {message['error']}")


async def send(writer: asyncio.StreamWriter, args: argparse.Namespace, sent: list[int]) -> None:
    """Send a reading every --interval-ms, --count of them (0: until stopped)."""
    kwh = round(random.uniform(1000, 5000), 3)
    while args.count == 0 or sent[0] < args.count:
        kwh = round(kwh + random.uniform(0.001, 0.05), 3)
        reading = {"meter": args.meter, "kwh": kwh, "seq": sent[0]}
        writer.write(json.dumps(reading).encode() + b"\n")
        await writer.drain()
        sent[0] += 1
        if args.verbose:
            say(f"sent {reading}")
        await asyncio.sleep(args.interval_ms / 1000)


async def run(args: argparse.Namespace) -> int:
    ctx = client_context(args)
    host, _, port = args.gateway.rpartition(":")
    host = host.strip("[]")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                int(port),
                ssl=ctx,
                server_hostname=args.server_name or host,
                limit=MAX_LINE,
            ),
            args.connect_timeout,
        )
    except ssl.SSLError as e:
        say(f"refused: TLS handshake failed: {_reason(e)}")
        return EXIT_REFUSED
    except (OSError, TimeoutError) as e:
        say(f"cannot reach the gateway at {args.gateway}: {_reason(e)}")
        return EXIT_UNREACHABLE
    tls = writer.get_extra_info("ssl_object")
    say(f"connected to {args.gateway} ({tls.version()})")

    # With TLS 1.3 the gateway checks our certificate after our side of the handshake
    # is done: a refusal arrives as an alert on the first read.
    try:
        greeting = await asyncio.wait_for(reader.readline(), args.connect_timeout)
    except (ssl.SSLError, ConnectionError, TimeoutError, ValueError) as e:
        say(f"refused: TLS handshake failed: {_reason(e)}")
        writer.transport.abort()
        return EXIT_REFUSED
    try:
        hello = json.loads(greeting) if greeting else {}
    except ValueError:
        hello = {}
    if not isinstance(hello, dict) or "admitted" not in hello:
        why = hello.get("refused") if isinstance(hello, dict) else None
        say(f"refused: {why or 'connection closed before admission'}")
        writer.close()
        return EXIT_REFUSED
    say(f"admitted as {hello['admitted']}")

    sent = [0]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listener = asyncio.create_task(listen(reader))
    sender = asyncio.create_task(send(writer, args, sent))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({listener, sender, stopped}, return_when=asyncio.FIRST_COMPLETED)

    if listener.done():
        say(f"closed by the gateway: {listener.result()}")
        status = EXIT_CLOSED
    elif sender.done() and sender.exception() is not None:
        # The write failed: the gateway went away; the listener tells why, if it can.
        try:
            why = await asyncio.wait_for(listener, 1.0)
        except TimeoutError:
            why = f"connection lost ({_reason(sender.exception())})"
        say(f"closed by the gateway: {why}")
        status = EXIT_CLOSED
    else:
        status = EXIT_OK
    for task in (listener, sender, stopped):
        task.cancel()
    await asyncio.gather(listener, sender, stopped, return_exceptions=True)
    say(f"sent {sent[0]} readings")
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    return status


def _reason(e: BaseException | None) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway", required=True, help="the gateway, HOST:PORT")
    p.add_argument(
        "--gateway-cert", required=True, help="the gateway's certificate (or its CA), PEM"
    )
    p.add_argument("--server-name", help="name to check the gateway's certificate against")
    p.add_argument("--agent-state", help="the agent's state dir: client-cert.pem, tls-key.pem")
    p.add_argument("--cert", help="client certificate (default: AGENT_STATE/client-cert.pem)")
    p.add_argument("--key", help="client key (default: AGENT_STATE/tls-key.pem)")
    p.add_argument("--meter", default="meter-1", help="meter id in the readings")
    p.add_argument("--interval-ms", type=int, default=1000, help="between readings")
    p.add_argument("--count", type=int, default=0, help="readings to send, then stop (0: no end)")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("-v", "--verbose", action="store_true", help="print every reading sent")
    args = p.parse_args(argv)
    if args.agent_state:
        state = Path(args.agent_state)
        args.cert = args.cert or str(state / "client-cert.pem")
        args.key = args.key or str(state / "tls-key.pem")
    if not (args.cert and args.key):
        p.error("give --agent-state, or --cert and --key")
    if args.interval_ms < 1 or args.count < 0:
        p.error("--interval-ms must be at least 1 and --count not negative")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
