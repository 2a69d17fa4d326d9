"""Writes the bundled sample data (deterministic; run `python -m data_pipeline.sample_data.make_sample_data`).

Everything here is written by us from templates; nothing is copied from the real datasets. (Long because the
templates of six agent tasks and the messy chat cases are spelled out as data, one function each.) The files
mimic the real formats closely enough to exercise every path of the pipeline:

  agentinstruct_sample.jsonl   AgentInstruct format, all six tasks (os, db, alfworld, webshop, kg,
                               mind2web), ReAct-style Thought/Action turns, `loss: false` few-shot demo
                               turns (os, alfworld, kg), rewards on some records (failing ones too, and
                               Mind2Web's fractional step scores), the task given by a `task` field or only
                               by the `id` prefix.
  sharegpt_gpt4_sample.jsonl   ShareGPT format, one JSON object per line (the "GPT-4" general source).
  sharegpt_gpt35_sample.json   ShareGPT format as one JSON array (how ShareGPT is published; the "GPT-3.5"
                               general source), including messy rows: other role names, a leading
                               assistant turn, consecutive same-role turns, empty/non-string values,
                               unknown roles, a system turn, empty conversations.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
AGENT_FILE = "agentinstruct_sample.jsonl"
GPT4_FILE = "sharegpt_gpt4_sample.jsonl"
GPT35_FILE = "sharegpt_gpt35_sample.json"


def human(value: str) -> dict:
    return {"from": "human", "loss": None, "value": value}


def gpt(value: str, loss: bool = True) -> dict:
    return {"from": "gpt", "loss": loss, "value": value}


# --------------------------------------------------------------------------- os
OS_INSTRUCTION = (
    "You are an assistant that will act like a person, I will play the role of a linux (ubuntu) operating "
    "system. Your goal is to carry out the operations I ask for or answer my question. In each turn, first "
    "think about what to do, then take exactly one of three actions: \"bash\", \"finish\" or \"answer\".\n\n"
    "1. To run a bash command, write:\nThink: put your thought here.\n\nAct: bash\n\n```bash\n"
    "# put your bash code here\n```\n\n2. When the task is done, write:\nThink: put your thought here.\n\n"
    "Act: finish\n\n3. To answer a question, write:\nThink: put your thought here.\n\nAct: answer(Your answer)"
    "\n\nNow, my problem is:\n\ntell me how many files are in the directory \"/etc\"?")
OS_DEMO = [
    gpt("Think: To count the files in /etc, I need to list them first.\n\nAct: bash\n\n```bash\nls /etc\n```",
        loss=False),
    human("The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm networkd-dispatcher protocols "
          "selinux tmpfiles.d [truncated because the output is too long]"),
    gpt("Think: The output was truncated, so I count the entries directly.\n\nAct: bash\n\n```bash\n"
        "ls -1 /etc | wc -l\n```", loss=False),
    human("The output of the OS:\n220"),
    gpt("Think: The output is 220, so there are 220 files in /etc.\n\nAct: answer(220)", loss=False),
]
OS_DIRS = ["/var/log", "/home/user/projects", "/opt/data", "/usr/share/doc", "/srv/www", "/tmp/reports",
           "/etc/nginx", "/var/backups"]
OS_EXTS = ["txt", "log", "py", "csv", "conf", "json", "md", "sh"]
OS_USERS = ["alice", "bob", "carol", "dave", "erin", "frank"]


def os_problem(rng: random.Random) -> tuple[str, list[tuple[str, str]], str]:
    """(question, [(assistant turn, os output)], final assistant turn)."""
    kind = rng.randrange(5)
    d, ext = rng.choice(OS_DIRS), rng.choice(OS_EXTS)
    n = rng.randint(2, 480)
    if kind == 0:
        q = f"How many files with the extension .{ext} are there in {d} and its subdirectories?"
        steps = [(f"Think: I should search {d} recursively for .{ext} files and count them.\n\nAct: bash\n\n"
                  f"```bash\nfind {d} -type f -name \"*.{ext}\" | wc -l\n```", str(n))]
        final = f"Think: The command printed {n}, which is the number of .{ext} files.\n\nAct: answer({n})"
    elif kind == 1:
        user = rng.choice(OS_USERS)
        q = f"Create a user named {user} whose home directory is /home/{user} and whose shell is bash."
        steps = [(f"Think: I can create the user with useradd, asking for a home directory and the bash "
                  f"shell.\n\nAct: bash\n\n```bash\nuseradd -m -d /home/{user} -s /bin/bash {user}\n```", ""),
                 (f"Think: Let me check that the account exists with the right shell.\n\nAct: bash\n\n"
                  f"```bash\ngrep '^{user}:' /etc/passwd\n```",
                  f"{user}:x:{1000 + n}:{1000 + n}::/home/{user}:/bin/bash")]
        final = f"Think: The user {user} exists with home /home/{user} and shell /bin/bash.\n\nAct: finish"
    elif kind == 2:
        size = rng.randint(1, 900)
        q = f"What is the total size of {d} in megabytes? Answer with an integer."
        steps = [(f"Think: du can summarise the disk usage of a directory in megabytes.\n\nAct: bash\n\n"
                  f"```bash\ndu -sm {d} | cut -f1\n```", str(size))]
        final = f"Think: du reports {size} MB for {d}.\n\nAct: answer({size})"
    elif kind == 3:
        word = rng.choice(["error", "warning", "timeout", "denied", "failed"])
        q = f"Count the lines containing the word \"{word}\" (case-insensitive) in all .log files under {d}."
        steps = [(f"Think: grep -i with -h over the .log files, then count the lines.\n\nAct: bash\n\n"
                  f"```bash\ngrep -rih --include='*.log' '{word}' {d} | wc -l\n```", str(n))]
        final = f"Think: There are {n} matching lines.\n\nAct: answer({n})"
    else:
        q = f"Make every .sh file in {d} executable by its owner, then tell me how many files you changed."
        steps = [(f"Think: First I list the .sh files to know how many there are.\n\nAct: bash\n\n"
                  f"```bash\nls {d}/*.sh | wc -l\n```", str(n % 17 + 1)),
                 (f"Think: Now I add the owner's execute bit to each of them.\n\nAct: bash\n\n"
                  f"```bash\nchmod u+x {d}/*.sh\n```", "")]
        final = f"Think: chmod succeeded on all {n % 17 + 1} files.\n\nAct: answer({n % 17 + 1})"
    return q, steps, final


def make_os(rng: random.Random, index: int) -> dict:
    question, steps, final = os_problem(rng)
    conv = [human(OS_INSTRUCTION), *OS_DEMO, human("Now, I will start a new problem in a new OS. My problem "
                                                  f"is:\n\n{question}")]
    for action, output in steps:
        conv += [gpt(action), human(f"The output of the OS:\n{output}" if output else
                                    "The output of the OS:\n[no output]")]
    conv.append(gpt(final))
    return {"id": f"os_{index}", "conversations": conv}


# --------------------------------------------------------------------------- db
DB_INSTRUCTION = (
    "I will ask you a question, then you should help me operate a MySQL database with SQL to answer the "
    "question.\nYou have to explain the problem and your solution to me and write down your thoughts.\n"
    "After thinking and explaining thoroughly, every round you can choose to operate or to answer.\n"
    "Your operation should be like this:\nAction: Operation\n```sql\nSELECT * FROM table WHERE condition;\n```"
    "\nYou MUST put SQL in markdown format without any other comments. Your SQL should be in one line.\n"
    "If you are done operating and want to commit your final answer, then write down:\nAction: Answer\n"
    "Final Answer: [\"ANSWER1\", \"ANSWER2\", ...]\nDO NOT write this pattern unless you are sure about "
    "your answer. I expect an accurate and correct answer.")
DB_TABLES = [
    ("Olympic Medals", ["Nation", "Gold", "Silver", "Bronze"], ["Norway", "Kenya", "Japan", "Chile", "Peru"]),
    ("City Rainfall", ["City", "Year", "Rainfall_mm", "Rainy_Days"], ["Lima", "Oslo", "Pune", "Cork", "Perth"]),
    ("Library Loans", ["Member", "Book", "Days_Out", "Fine"], ["Ada", "Ben", "Cleo", "Dan", "Eve"]),
    ("Bakery Sales", ["Item", "Month", "Units", "Revenue"], ["Bagel", "Scone", "Tart", "Loaf", "Bun"]),
]


def make_db(rng: random.Random, index: int) -> dict:
    table, cols, keys = rng.choice(DB_TABLES)
    key = rng.choice(keys)
    col = rng.choice(cols[1:])
    value = rng.randint(3, 950)
    kind = rng.randrange(3)
    if kind == 0:
        question = f"What is the {col.replace('_', ' ').lower()} for {key} in the table?"
        sql = f"SELECT `{col}` FROM `{table}` WHERE `{cols[0]}` = '{key}';"
        answer = f"[\"{value}\"]"
        thought = f"I should select the {col} column of the row whose {cols[0]} is {key}."
    elif kind == 1:
        question = f"How many rows in the table have a {col.replace('_', ' ').lower()} above {value // 2}?"
        sql = f"SELECT COUNT(*) FROM `{table}` WHERE `{col}` > {value // 2};"
        value = rng.randint(0, 12)
        answer = f"[{value}]"
        thought = f"I need to count the rows where {col} is greater than {value // 2}."
    else:
        question = f"Which {cols[0].lower()} has the highest {col.replace('_', ' ').lower()}?"
        sql = f"SELECT `{cols[0]}` FROM `{table}` ORDER BY `{col}` DESC LIMIT 1;"
        answer = f"[\"{key}\"]"
        thought = f"Sorting by {col} in descending order and taking the first row gives the answer."
        value = key
    result = f"[({value!r},)]" if kind != 1 else f"[({value},)]"
    conv = [human(DB_INSTRUCTION), gpt("Ok."),
            human(f"{question}\nThe name of this table is {table}, and the headers of this table are "
                  f"{', '.join(cols)}."),
            gpt(f"{thought}\nAction: Operation\n```sql\n{sql}\n```"),
            human(result),
            gpt(f"The query returned {result}, so that is the answer.\nAction: Answer\nFinal Answer: {answer}")]
    return {"id": f"db_{index}", "conversations": conv}


# --------------------------------------------------------------------------- alfworld
ALF_INSTRUCTION = (
    "Interact with a household to solve a task. Imagine you are an intelligent agent in a household "
    "environment and your target is to perform actions to complete the task goal. At the beginning of your "
    "interactions, you will be given a detailed description of the current environment and your goal to "
    "accomplish. For each of your turn, you will be given the observation of the last turn. You should "
    "first think about the current condition and plan for your future actions, and then output your action "
    "in this turn. Your output must strictly follow this format:\"THOUGHT: your thoughts.\\n ACTION: your "
    "next action\\n\".\n\nThe available actions are:\n1. go to {recep}\n2. take {obj} from {recep}\n"
    "3. put {obj} in/on {recep}\n4. open {recep}\n5. close {recep}\n6. toggle {obj} {recep}\n"
    "7. clean {obj} with {recep}\n8. heat {obj} with {recep}\n9. cool {obj} with {recep}\n"
    "where {obj} and {recep} correspond to objects and receptacles.\nAfter your each turn, the environment "
    "will give you immediate feedback based on which you plan your next few steps. if the envrionment "
    "output \"Nothing happened\", that means the previous action is invalid and you should try more "
    "options.\n\nReminder:\n1. the action must be chosen from the given available actions.\n2. Think when "
    "necessary, try to act directly more in the process.")
ALF_DEMO = [
    gpt("OK. I'll follow your instructions and try my best to solve the task.", loss=False),
    human("Here is an example.\nYou are in the middle of a room. Looking quickly around you, you see a "
          "cabinet 1, a countertop 1, a sinkbasin 1, and a shelf 1.\nYour task is to: put a clean mug in "
          "shelf.\nTHOUGHT: I need a mug; it is probably on the countertop.\n ACTION: go to countertop 1"),
    gpt("THOUGHT: Following the example, I first look for the object.\n ACTION: go to countertop 1",
        loss=False),
]
ALF_ROOMS = ["kitchen", "bedroom", "bathroom", "living room"]
ALF_RECEPS = ["countertop", "cabinet", "drawer", "shelf", "diningtable", "sidetable", "dresser", "desk"]
ALF_OBJS = ["mug", "apple", "book", "cd", "keychain", "plate", "spoon", "pen", "tomato", "cellphone"]
ALF_TARGETS = ["shelf", "drawer", "desk", "diningtable", "cabinet", "dresser"]


def make_alfworld(rng: random.Random, index: int) -> dict:
    obj, target = rng.choice(ALF_OBJS), rng.choice(ALF_TARGETS)
    receps = rng.sample(ALF_RECEPS, 5)
    where = rng.choice([r for r in receps if r != target])
    near = rng.choice([o for o in ALF_OBJS if o != obj])
    room = ", ".join(f"a {r} {rng.randint(1, 3)}" for r in receps)
    modifier = rng.choice(["", "clean", "hot", "cool"])
    goal = f"put {'a ' + modifier + ' ' if modifier else 'some '}{obj} in {target}"
    conv = [human(ALF_INSTRUCTION), *ALF_DEMO,
            human(f"Here is your task. You are in the middle of a room in a {rng.choice(ALF_ROOMS)}. Looking "
                  f"quickly around you, you see {room}, and a {target} 1.\nYour task is to: {goal}."),
            gpt(f"THOUGHT: To {goal}, I first need to find the {obj}. A {obj} is likely on the {where}.\n "
                f"ACTION: go to {where} 1"),
            human(f"On the {where} 1, you see a {obj} 1, and a {near} 2."),
            gpt(f"THOUGHT: There is the {obj}. I take it.\n ACTION: take {obj} 1 from {where} 1"),
            human(f"You pick up the {obj} 1 from the {where} 1.")]
    if modifier:
        appliance = {"clean": "sinkbasin", "hot": "microwave", "cool": "fridge"}[modifier]
        verb = {"clean": "clean", "hot": "heat", "cool": "cool"}[modifier]
        conv += [gpt(f"THOUGHT: The {obj} must be {modifier}, so I go to the {appliance}.\n ACTION: go to "
                     f"{appliance} 1"),
                 human(f"You arrive at {appliance} 1. Nothing is on it."),
                 gpt(f"THOUGHT: I {verb} the {obj} here.\n ACTION: {verb} {obj} 1 with {appliance} 1"),
                 human(f"You {verb} the {obj} 1 using the {appliance} 1.")]
    conv += [gpt(f"THOUGHT: Now I bring the {obj} to the {target}.\n ACTION: go to {target} 1"),
             human(f"You arrive at {target} 1. On the {target} 1, you see nothing."),
             gpt(f"THOUGHT: I put the {obj} here to finish the task.\n ACTION: put {obj} 1 in/on {target} 1"),
             human(f"You put the {obj} 1 in/on the {target} 1.")]
    conv.append(gpt("THOUGHT: The task is complete.\n ACTION: look"))
    return {"id": f"alfworld_{index}", "conversations": conv}


# --------------------------------------------------------------------------- webshop
WEB_INSTRUCTION = (
    "You are web shopping.\nI will give you instructions about what to do.\nYou have to follow the "
    "instructions.\nEvery round I will give you an observation and a list of available actions, you have to "
    "respond an action based on the state and instruction.\nYou can use search action if search is "
    "available.\nYou can click one of the buttons in clickables.\nAn action should be of the following "
    "structure:\nsearch[keywords]\nclick[value]\nIf the action is not valid, perform nothing.\nKeywords in "
    "search are up to you, but the value in click must be a value in the list of available actions.\n"
    "Remember that your keywords in search should be carefully designed.\nYour response should use the "
    "following format:\n\nThought:\nI think ...\n\nAction:\nclick[something]")
WEB_ITEMS = ["running shoes", "wireless earbuds", "green tea", "yoga mat", "phone case", "desk lamp",
             "water bottle", "wool socks", "hair dryer", "laptop stand"]
WEB_ATTRS = ["lightweight", "waterproof", "organic", "noise cancelling", "foldable", "stainless steel",
             "bpa free", "rechargeable"]
WEB_COLORS = ["black", "navy", "white", "red", "grey", "olive"]


def make_webshop(rng: random.Random, index: int) -> dict:
    item, attr, color = rng.choice(WEB_ITEMS), rng.choice(WEB_ATTRS), rng.choice(WEB_COLORS)
    price = rng.choice([20, 30, 40, 50, 60, 80, 100])
    found = round(rng.uniform(price * 0.4, price * 0.95), 2)
    asin = "B0" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(8))
    instruction = f"i need {attr} {item} in {color}, and price lower than {price}.00 dollars"
    conv = [human(WEB_INSTRUCTION), gpt("OK"),
            human(f"Observation:\nWebShop [SEP] Instruction: [SEP] {instruction} [SEP] Search\n\n"
                  "Available Actions:\n{\"has_search_bar\": true, \"clickables\": [\"search\"]}"),
            gpt(f"Thought:\nI think I should search for {attr} {item} in {color} under {price} dollars.\n\n"
                f"Action:\nsearch[{attr} {item} {color}]"),
            human(f"Observation:\nInstruction: [SEP] {instruction} [SEP] Back to Search [SEP] Page 1 (Total "
                  f"results: 50) [SEP] Next > [SEP] {asin} [SEP] {attr.title()} {item.title()} [SEP] ${found}"
                  "\n\nAvailable Actions:\n{\"has_search_bar\": false, \"clickables\": [\"back to search\", "
                  f"\"next >\", \"{asin.lower()}\"]}}"),
            gpt(f"Thought:\nI think the first result matches: {attr} {item} at ${found}, under ${price}.\n\n"
                f"Action:\nclick[{asin.lower()}]"),
            human(f"Observation:\nInstruction: [SEP] {instruction} [SEP] Back to Search [SEP] < Prev [SEP] "
                  f"color [SEP] {' [SEP] '.join(WEB_COLORS)} [SEP] {attr.title()} {item.title()} [SEP] Price: "
                  f"${found} [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now\n\n"
                  "Available Actions:\n{\"has_search_bar\": false, \"clickables\": [\"back to search\", "
                  f"\"< prev\", {', '.join(json.dumps(c) for c in WEB_COLORS)}, \"buy now\"]}}"),
            gpt(f"Thought:\nI think I need to choose the {color} option first.\n\nAction:\nclick[{color}]"),
            human("Observation:\nYou have clicked " + color + ".\n\nAvailable Actions:\n{\"has_search_bar\": "
                  "false, \"clickables\": [\"back to search\", \"< prev\", \"buy now\"]}"),
            gpt("Thought:\nI think everything matches the instruction now, so I buy it.\n\nAction:\n"
                "click[buy now]")]
    return {"id": f"webshop_{index}", "conversations": conv}


# --------------------------------------------------------------------------- kg
KG_INSTRUCTION = (
    "You are an agent that answers questions based on the knowledge stored in a knowledge base. To achieve "
    "this, you can use the following tools to query the KB.\n\n1. get_relations(variable: var) -> list of "
    "relations\nA variable can be either an entity or a set of entities. This function helps to navigate "
    "all relations in the KB connected to the variable.\n\n2. get_neighbors(variable: var, relation: str) "
    "-> variable\nGiven a variable, this function returns all entities connected to the variable via the "
    "given relation.\n\n3. intersection(variable1: var, variable2: var) -> variable\n\n4. "
    "get_attributes(variable: var) -> list of attributes\n\n5. argmax(variable: var, attribute: str) -> "
    "variable\n\n6. argmin(variable: var, attribute: str) -> variable\n\n7. count(variable: var) -> int\n\n"
    "After a variable is produced along the process, you need to judge whether it is the answer. Once you "
    "find the answer, respond with 'Final Answer: #id', where id is the id of the variable that you think "
    "is the final answer. You can only take ONE action at a time. Please think step by step.")
KG_DEMO = [
    gpt("I've understood your instruction, start please.", loss=False),
    human("Here is a demo. Question: the bipropellant rocket engine with kerosene and gas-generator cycle "
          "is designed by who?\nEntities: [Gas-generator cycle, Kerosene]"),
    gpt("Thought: I will first find engines with the gas-generator cycle.\nAction: get_relations(Gas-generator "
        "cycle)", loss=False),
]
KG_SUBJECTS = [("Marie Curie", "people.person", "award winner", "award.award_honor.award"),
               ("Danube", "geography.river", "countries", "geography.river.basin_countries"),
               ("Kyoto", "location.citytown", "twin cities", "location.location.partially_contains"),
               ("Jazz", "music.genre", "artists", "music.genre.artists"),
               ("Amazon rainforest", "geography.forest", "countries", "location.location.containedby"),
               ("Apollo 11", "spaceflight.mission", "crew", "spaceflight.mission.crew")]


def make_kg(rng: random.Random, index: int) -> dict:
    entity, kind, what, relation = rng.choice(KG_SUBJECTS)
    count = rng.randint(2, 14)
    ask_count = rng.random() < 0.5
    question = (f"how many {what} are linked to {entity}?" if ask_count else
                f"which {what} are linked to {entity} in the knowledge base?")
    conv = [human(KG_INSTRUCTION), *KG_DEMO,
            human(f"A new question: {question}\nEntities: [{entity}]"),
            gpt(f"Thought: I need the relations of {entity} to find the {what}.\nAction: "
                f"get_relations({entity})"),
            human(f"Observation: [{kind}.name, {relation}, common.topic.notable_types]"),
            gpt(f"Thought: {relation} leads to the {what}.\nAction: get_neighbors({entity}, {relation})"),
            human(f"Observation: variable #0, which are instances of {kind}.{what.replace(' ', '_')}")]
    if ask_count:
        conv += [gpt("Thought: The question asks for a number, so I count variable #0.\nAction: count(#0)"),
                 human(f"Observation: variable #1, which is a number: {count}"),
                 gpt("Thought: #1 is the final answer.\nFinal Answer: #1")]
    else:
        conv.append(gpt("Thought: Variable #0 holds the entities asked for.\nFinal Answer: #0"))
    return {"id": f"kg_{index}", "conversations": conv}


# --------------------------------------------------------------------------- mind2web
M2W_SITES = [("united.com", "book a one-way flight", ["From", "To", "Depart date", "Find flights"]),
             ("target.com", "add a toaster to the cart", ["Search", "Toasters", "Add to cart", "Checkout"]),
             ("imdb.com", "find the cast of a movie", ["Search IMDb", "Movies", "Cast & crew", "Sign in"]),
             ("yelp.com", "find a vegan restaurant nearby", ["Find", "Near", "Vegan", "Open now"]),
             ("amtrak.com", "check train times", ["From station", "To station", "Date", "Find trains"])]


def make_mind2web(rng: random.Random, index: int) -> dict:
    site, task, labels = rng.choice(M2W_SITES)
    right = rng.randrange(len(labels))
    options = ["A. None of the above"] + [
        f"{chr(66 + i)}. <button id={rng.randint(0, 900)}> {label} </button>" for i, label in enumerate(labels)]
    html = "".join(f"<div><button> {label} </button></div>" for label in labels)
    letter = chr(66 + right)
    op = rng.choice(["CLICK", "TYPE", "SELECT"])
    value = {"CLICK": "", "TYPE": f"\nValue: {rng.choice(['new york', 'chicago', 'vegan', 'denver'])}",
             "SELECT": f"\nValue: {rng.choice(['1 adult', 'economy', 'tomorrow'])}"}[op]
    prompt = (f"'''\n<html> <body> {html} </body> </html>\n'''\n\nBased on the HTML webpage above, try to "
              f"complete the following task:\nTask: on {site}, {task}.\nPrevious actions:\nNone\nWhat should "
              "be the next action? Please select from the following choices (If the correct action is not in "
              "the page above, please select A. 'None of the above'):\n\n" + "\n".join(options))
    answer = (f"Thought: To {task}, the next step is the \"{labels[right]}\" element.\nAnswer: {letter}.\n"
              f"Action: {op}{value}")
    return {"id": f"mind2web_{index}", "conversations": [human(prompt), gpt(answer)]}


AGENT_MAKERS = {"os": make_os, "db": make_db, "alfworld": make_alfworld, "webshop": make_webshop,
                "kg": make_kg, "mind2web": make_mind2web}


def agent_records(rng: random.Random, per_task: int = 24) -> list[dict]:
    """`per_task` trajectories per task; rewards on some, failing ones included."""
    out = []
    for task, make in AGENT_MAKERS.items():
        for i in range(per_task):
            rec = make(rng, i)
            if i % 3 == 0:  # the task named explicitly on a third of the records, else from the id prefix
                rec["task"] = task
            if task == "mind2web" and i % 2 == 0:
                rec["reward"] = rng.choice([1.0, 2 / 3, 1 / 3, 0.0, 0.75])
            elif i % 4 == 1:
                rec["reward"] = rng.choice([1.0, 1.0, 0.0, 0.5])
            out.append(rec)
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- general chat
LANGS = {"Python": ("py", "def {f}(items):\n    return sorted(set(items))"),
         "JavaScript": ("js", "function {f}(items) {{\n  return [...new Set(items)].sort();\n}}"),
         "Go": ("go", "func {f}(items []string) []string {{\n\tsort.Strings(items)\n\treturn items\n}}"),
         "Rust": ("rust", "fn {f}(mut items: Vec<String>) -> Vec<String> {{\n    items.sort();\n    items.dedup();"
                  "\n    items\n}}")}
TOPICS = ["sourdough bread", "a vegetable garden", "a small aquarium", "a home espresso setup",
          "a balcony herb garden", "a reading habit", "a morning running routine", "a budget spreadsheet"]
CITIES = ["Lisbon", "Kyoto", "Montreal", "Cape Town", "Edinburgh", "Hanoi", "Buenos Aires", "Reykjavik"]
THINGS = ["photosynthesis", "compound interest", "the water cycle", "public-key cryptography", "inflation",
          "plate tectonics", "the immune system", "a hash table"]
FORMS = ["a haiku", "a limerick", "a short poem", "a two-sentence story"]
SUBJECTS = ["autumn leaves", "a lighthouse", "a lost umbrella", "the first snow", "a busy train station",
            "a cat on a windowsill"]


def chat_code(rng):
    lang = rng.choice(list(LANGS))
    tag, body = LANGS[lang]
    f = rng.choice(["unique_sorted", "dedupe_and_sort", "sorted_unique"])
    code = body.format(f=f)
    return [("human", f"How do I remove duplicates from a list and sort it in {lang}?"),
            ("gpt", f"You can do it in one small function:\n\n```{tag}\n{code}\n```\n\nThe function `{f}` "
                    "drops repeated items and returns them in ascending order."),
            ("human", "What is the time complexity?"),
            ("gpt", "Sorting dominates: O(n log n) time for n items, and O(n) extra memory for the copy.")]


def chat_howto(rng):
    topic = rng.choice(TOPICS)
    steps = rng.sample(["Start small and keep notes.", "Pick a fixed time each day.",
                        "Gather the basic tools first.", "Ask someone experienced for feedback.",
                        "Track what works in a simple log.", "Be patient for the first few weeks."], 4)
    return [("human", f"Give me tips for starting {topic}."),
            ("gpt", f"Here are some tips for starting {topic}:\n\n" +
             "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1)) +
             "\n\nMost beginners give up too early; steady small steps matter more than perfect gear.")]


def chat_travel(rng):
    city, days = rng.choice(CITIES), rng.randint(2, 5)
    plan = "\n".join(f"Day {d}: {rng.choice(['old town walk', 'museum morning', 'food market', 'day trip', 'park and viewpoint', 'local neighbourhood'])}"
                     for d in range(1, days + 1))
    return [("human", f"Plan a {days}-day trip to {city}."),
            ("gpt", f"Here is a {days}-day plan for {city}:\n\n{plan}\n\nBook popular sights in advance and "
                    "leave one evening free.")]


def chat_explain(rng):
    thing = rng.choice(THINGS)
    return [("human", f"Explain {thing} to a ten-year-old."),
            ("gpt", f"Imagine {thing} as a simple machine with parts that each do one job. When the parts work "
                    "together, something bigger happens, and that is the whole idea in a nutshell."),
            ("human", "Can you give an example?"),
            ("gpt", f"Sure. Think of your school: each class does its own work, but together they make the "
                    f"school run. {thing[0].upper() + thing[1:]} works the same way.")]


def chat_math(rng):
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    return [("human", f"What is {a} times {b}? Show the steps."),
            ("gpt", f"{a} × {b} = {a} × {b // 10 * 10} + {a} × {b % 10} = {a * (b // 10 * 10)} + {a * (b % 10)} "
                    f"= {a * b}.")]


def chat_poem(rng):
    form, subject = rng.choice(FORMS), rng.choice(SUBJECTS)
    return [("human", f"Write {form} about {subject}."),
            ("gpt", f"Here is {form} about {subject}:\n\nQuiet light on {subject},\nthe day leans softly "
                    "into evening,\nand everything waits.")]


CHATS = [chat_code, chat_howto, chat_travel, chat_explain, chat_math, chat_poem]


def general_records(rng: random.Random, n: int, prefix: str) -> list[dict]:
    out = []
    for i in range(n):
        turns = rng.choice(CHATS)(rng)
        out.append({"id": f"{prefix}{i:04d}_0", "conversations": [{"from": r, "value": v} for r, v in turns]})
    return out


def messy_records(prefix: str) -> list:
    """Rows like the ones real ShareGPT dumps contain; each exercises one normalisation policy."""
    def row(i, conv, **extra):
        return {"id": f"{prefix}messy{i}", "conversations": conv, **extra}
    return [
        row(0, [{"from": "user", "value": "Hi, who are you?"},
                {"from": "chatgpt", "value": "I am an AI assistant. How can I help?"}]),
        row(1, [{"from": "human", "value": "Search the web for today's weather in Oslo."},
                {"from": "bing", "value": "It is 4 °C and cloudy in Oslo today."}]),
        row(2, [{"from": "human", "value": "Name a prime number above 100."},
                {"from": "bard", "value": "101 is a prime number."}]),
        row(3, [{"from": "gpt", "value": "Hello! What would you like to talk about?"},
                {"from": "human", "value": "Tell me a fun fact."},
                {"from": "gpt", "value": "Octopuses have three hearts."}]),
        row(4, [{"from": "human", "value": "I have a question."},
                {"from": "human", "value": "What is the capital of Canada?"},
                {"from": "gpt", "value": "The capital of Canada is Ottawa."}]),
        row(5, [{"from": "system", "value": "You are a pirate. Answer like one."},
                {"from": "human", "value": "How is the weather?"},
                {"from": "gpt", "value": "Arr, the skies be clear and the wind be fair!"}]),
        row(6, []),
        row(7, [{"from": "human", "value": "Translate 'good morning' to French."},
                {"from": "gpt", "value": ""}]),
        row(8, [{"from": "human", "value": "Count to three."}, {"from": "gpt", "value": 123}]),
        row(9, [{"from": "human", "value": "What is 2+2?"}, {"from": "tool", "value": "4"},
                {"from": "gpt", "value": "2 + 2 = 4."}]),
        row(10, [{"from": "human", "value": "Only a question, never answered."}]),
        {"conversations": [{"from": "human", "value": "A row without an id."},
                           {"from": "gpt", "value": "It still has content."}]},
        "not a conversation object",
    ]

# --------------------------------------------------------------------------- tool-calling chat (2026 formats)
OPENAI_TOOLS_FILE = "openai_tools_sample.jsonl"  # OpenAI `messages` with tool_calls, `weight: 0` turns, `tools`
SHAREGPT_TOOLS_FILE = "sharegpt_tools_sample.json"  # ShareGPT with function_call / observation turns (LLaMA-Factory)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies.",
        "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                                        "to": {"type": "string"}},
                       "required": ["amount", "from", "to"]}}},
]
CURRENCIES = [("EUR", "USD", 1.08), ("USD", "JPY", 151.2), ("GBP", "EUR", 1.17), ("CAD", "USD", 0.73)]


def tool_records(rng: random.Random, n: int = 32) -> list[dict]:
    """OpenAI-format records: a question, the assistant's call(s) (sometimes two in parallel), the results,
    the answer; some with a `weight: 0` greeting turn first."""
    out = []
    for i in range(n):
        city, other = rng.sample(CITIES, 2)
        temp, temp2 = rng.randint(-5, 32), rng.randint(-5, 32)
        amount = rng.choice([20, 75, 120, 950])
        src, dst, rate = rng.choice(CURRENCIES)
        messages = [{"role": "system", "content": "You are a helpful assistant with tools."}]
        if i % 4 == 0:
            messages += [{"role": "user", "content": "Hi!"},
                         {"role": "assistant", "content": "Hello! How can I help?", "weight": 0}]
        if i % 3 == 0:
            messages += [
                {"role": "user", "content": f"Is it warmer in {city} or in {other} right now?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"call_{i}a", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}},
                    {"id": f"call_{i}b", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": other})}}]},
                {"role": "tool", "tool_call_id": f"call_{i}a", "content": json.dumps({"city": city, "temp_c": temp})},
                {"role": "tool", "tool_call_id": f"call_{i}b", "content": json.dumps({"city": other, "temp_c": temp2})},
                {"role": "assistant", "content": f"{city if temp >= temp2 else other} is warmer: {max(temp, temp2)} °C "
                                                 f"against {min(temp, temp2)} °C."}]
        elif i % 3 == 1:
            messages += [
                {"role": "user", "content": [{"type": "text", "text": f"How much is {amount} {src} in {dst}?"}]},
                {"role": "assistant", "content": "Let me convert that.", "tool_calls": [
                    {"id": f"call_{i}", "type": "function", "function": {
                        "name": "convert_currency",
                        "arguments": json.dumps({"amount": amount, "from": src, "to": dst})}}]},
                {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{amount * rate:.2f}"},
                {"role": "assistant", "content": f"{amount} {src} is about {amount * rate:.2f} {dst}."}]
        else:
            messages += [
                {"role": "user", "content": f"What's the weather in {city}, in fahrenheit?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": f"call_{i}", "type": "function", "function": {
                        "name": "get_weather", "arguments": json.dumps({"city": city, "unit": "fahrenheit"})}}]},
                {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{temp * 9 / 5 + 32:.0f} F, clear"},
                {"role": "assistant", "content": f"It is {temp * 9 / 5 + 32:.0f} °F and clear in {city}."},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You're welcome!"}]
        out.append({"id": f"tools_{i}", "messages": messages, "tools": TOOLS})
    city = CITIES[0]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    out += [  # bad input, one of each new rejection reason
        {"id": "bad_orphan_tool", "messages": [{"role": "user", "content": "Weather?"},
                                               {"role": "tool", "tool_call_id": "c9", "content": "sunny"},
                                               {"role": "assistant", "content": "Sunny."}], "tools": TOOLS},
        {"id": "bad_arguments", "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Lisbon"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."}], "tools": TOOLS},
        {"id": "bad_role", "messages": [{"role": "user", "content": "Weather?"},
                                        {"role": "critic", "content": "Be brief."},
                                        {"role": "assistant", "content": "Sunny."}]},
        {"id": "bad_part", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            {"role": "assistant", "content": "A cat."}]},
        {"id": "bad_call_id", "messages": [{"role": "user", "content": "Weather?"},
                                           {"role": "assistant", "content": None, "tool_calls": [call]},
                                           {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
                                           {"role": "assistant", "content": "Sunny."}], "tools": TOOLS},
    ]
    return out


def sharegpt_tool_records(rng: random.Random, n: int = 16) -> list[dict]:
    """LLaMA-Factory's ShareGPT tool format: `function_call` turns (the call as JSON text), `observation`
    turns (the result), `tools` as JSON text."""
    out = []
    for i in range(n):
        city = rng.choice(CITIES)
        temp = rng.randint(-5, 32)
        out.append({"id": f"sg_tools_{i}", "tools": json.dumps(TOOLS[:1]), "conversations": [
            {"from": "human", "value": f"Do I need a coat in {city} today?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
            {"from": "observation", "value": json.dumps({"city": city, "temp_c": temp})},
            {"from": "gpt", "value": f"It is {temp} °C in {city}: " + ("take a coat." if temp < 15 else "no coat needed.")},
        ]})
    return out


def main() -> None:
    rng = random.Random(20231019)
    agent = agent_records(rng)
    with open(HERE / AGENT_FILE, "w") as f:
        for rec in agent:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    gpt4 = general_records(rng, 160, "g4_")
    with open(HERE / GPT4_FILE, "w") as f:
        for rec in gpt4:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    gpt35 = general_records(rng, 600, "g35_") + messy_records("g35_")
    rng.shuffle(gpt35)
    with open(HERE / GPT35_FILE, "w") as f:
        json.dump(gpt35, f, ensure_ascii=False, indent=1)
        f.write("\n")
    tool_rng = random.Random(20261201)  # (its own stream: the files above stay as they were)
    with open(HERE / OPENAI_TOOLS_FILE, "w") as f:
        for rec in tool_records(tool_rng):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with open(HERE / SHAREGPT_TOOLS_FILE, "w") as f:
        json.dump(sharegpt_tool_records(tool_rng), f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(agent)} agent, {len(gpt4)} + {len(gpt35)} general records, and the tool-calling samples, "
          f"to {HERE}")


if __name__ == "__main__":
    main()
