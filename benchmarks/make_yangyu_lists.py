"""Build the 杨语 (made-up relation) word lists: `X的杨语是Y`.

X is a common Chinese word, Y its plain one-word lowercase English translation.
Run once: python benchmarks/make_yangyu_lists.py  -> writes nanoinfer/bench/data/yangyu/
train.txt (500) and val.txt (260).
"""

import random
import re
from pathlib import Path

N_TRAIN, N_VAL = 500, 260
MUST_VAL = ("变压器", "transformer")

RAW = """
老虎 tiger 狮子 lion 大象 elephant 猴子 monkey 熊猫 panda 长颈鹿 giraffe 斑马 zebra
袋鼠 kangaroo 狐狸 fox 狼 wolf 兔子 rabbit 老鼠 mouse 松鼠 squirrel 骆驼 camel
河马 hippopotamus 犀牛 rhinoceros 鳄鱼 crocodile 蛇 snake 青蛙 frog 乌龟 turtle
海豚 dolphin 鲸鱼 whale 鲨鱼 shark 章鱼 octopus 螃蟹 crab 龙虾 lobster 虾 shrimp
蝴蝶 butterfly 蜜蜂 bee 蚂蚁 ant 蜘蛛 spider 蚊子 mosquito 苍蝇 fly 蜻蜓 dragonfly
蝙蝠 bat 猫头鹰 owl 鹦鹉 parrot 孔雀 peacock 企鹅 penguin 天鹅 swan 鸽子 pigeon
燕子 swallow 老鹰 eagle 麻雀 sparrow 乌鸦 crow 鸭子 duck 鹅 goose 母鸡 hen
公鸡 rooster 小鸡 chick 奶牛 cow 公牛 bull 绵羊 sheep 山羊 goat 猪 pig 马 horse
驴 donkey 骡子 mule 狗 dog 猫 cat 小狗 puppy 小猫 kitten 鹿 deer 熊 bear
豹子 leopard 猎豹 cheetah 大猩猩 gorilla 刺猬 hedgehog 蜗牛 snail 蚯蚓 earthworm
蝎子 scorpion 蟑螂 cockroach 蝗虫 locust 蟋蟀 cricket 萤火虫 firefly 水母 jellyfish
海星 starfish 海豹 seal 海鸥 seagull 火烈鸟 flamingo 啄木鸟 woodpecker 鸵鸟 ostrich
蝌蚪 tadpole 金鱼 goldfish 鲤鱼 carp 三文鱼 salmon 金枪鱼 tuna 鳗鱼 eel 牡蛎 oyster
蛤蜊 clam 鱿鱼 squid 蜥蜴 lizard 恐龙 dinosaur 考拉 koala 水獭 otter 浣熊 raccoon
臭鼬 skunk 海狸 beaver 仓鼠 hamster 狒狒 baboon 树懒 sloth 豪猪 porcupine
羚羊 antelope 牦牛 yak 鸡 chicken 动物 animal 鸟 bird 鱼 fish 昆虫 insect 宠物 pet

苹果 apple 香蕉 banana 橙子 orange 葡萄 grape 西瓜 watermelon 草莓 strawberry
樱桃 cherry 桃子 peach 梨 pear 柠檬 lemon 芒果 mango 菠萝 pineapple 椰子 coconut
猕猴桃 kiwi 李子 plum 杏 apricot 石榴 pomegranate 蓝莓 blueberry 木瓜 papaya
榴莲 durian 荔枝 lychee 西柚 grapefruit 柚子 pomelo 无花果 fig 甜瓜 melon 橄榄 olive
土豆 potato 西红柿 tomato 胡萝卜 carrot 洋葱 onion 大蒜 garlic 生姜 ginger
黄瓜 cucumber 茄子 eggplant 南瓜 pumpkin 白菜 cabbage 菠菜 spinach 芹菜 celery
蘑菇 mushroom 玉米 corn 豌豆 pea 豆子 bean 辣椒 chili 胡椒 pepper 生菜 lettuce
萝卜 radish 西兰花 broccoli 花生 peanut 核桃 walnut 栗子 chestnut 杏仁 almond
米饭 rice 面包 bread 面条 noodles 饺子 dumpling 包子 bun 鸡蛋 egg 牛奶 milk
奶酪 cheese 黄油 butter 酸奶 yogurt 蛋糕 cake 饼干 cookie 巧克力 chocolate
糖果 candy 蜂蜜 honey 果酱 jam 盐 salt 糖 sugar 醋 vinegar 油 oil 面粉 flour
汤 soup 沙拉 salad 三明治 sandwich 汉堡 hamburger 披萨 pizza 香肠 sausage 火腿 ham
培根 bacon 牛排 steak 牛肉 beef 猪肉 pork 羊肉 mutton 咖啡 coffee 茶 tea 果汁 juice
啤酒 beer 葡萄酒 wine 水 water 可乐 cola 早餐 breakfast 午餐 lunch 晚餐 dinner
甜点 dessert 零食 snack 爆米花 popcorn 布丁 pudding 馅饼 pie 煎饼 pancake
粥 porridge 豆腐 tofu 寿司 sushi 咖喱 curry 吐司 toast 麦片 cereal 燕麦 oats
小麦 wheat 番茄酱 ketchup 芥末 mustard 香草 vanilla 肉桂 cinnamon 薄荷 mint
坚果 nut 种子 seed 蛋白质 protein 维生素 vitamin 饮料 beverage 食物 food 水果 fruit
蔬菜 vegetable 肉 meat 菜单 menu 厨师 chef 月饼 mooncake

桌子 table 椅子 chair 床 bed 沙发 sofa 柜子 cabinet 衣柜 wardrobe 书架 bookshelf
抽屉 drawer 镜子 mirror 窗户 window 门 door 墙 wall 地板 floor 天花板 ceiling
屋顶 roof 楼梯 stairs 台灯 lamp 灯泡 bulb 蜡烛 candle 钥匙 key 锁 lock 枕头 pillow
被子 quilt 毯子 blanket 床单 bedsheet 窗帘 curtain 地毯 carpet 垫子 cushion
毛巾 towel 肥皂 soap 牙刷 toothbrush 牙膏 toothpaste 梳子 comb 剪刀 scissors
扫帚 broom 拖把 mop 水桶 bucket 垃圾 garbage 盒子 box 篮子 basket 袋子 bag
瓶子 bottle 杯子 cup 玻璃 glass 碗 bowl 盘子 plate 筷子 chopsticks 勺子 spoon
叉子 fork 刀 knife 锅 pot 平底锅 pan 水壶 kettle 茶壶 teapot 冰箱 refrigerator
微波炉 microwave 烤箱 oven 炉子 stove 电视 television 收音机 radio 电话 telephone
手机 phone 时钟 clock 手表 watch 日历 calendar 花瓶 vase 相框 frame 照片 photo
海报 poster 风扇 fan 加热器 heater 插座 socket 电池 battery 电线 wire 开关 switch
遥控器 remote 雨伞 umbrella 钱包 wallet 钱 money 硬币 coin 信封 envelope 邮票 stamp
信 letter 包裹 parcel 礼物 gift 玩具 toy 娃娃 doll 气球 balloon 风筝 kite
拼图 puzzle 绳子 rope 线 thread 针 needle 纽扣 button 拉链 zipper 别针 pin
胶水 glue 胶带 tape 钉子 nail 螺丝 screw 锤子 hammer 锯子 saw 钳子 pliers
扳手 wrench 螺丝刀 screwdriver 斧头 axe 铲子 shovel 梯子 ladder 电钻 drill
水龙头 faucet 管子 pipe 水槽 sink 浴缸 bathtub 马桶 toilet 淋浴 shower
门铃 doorbell 信箱 mailbox 栅栏 fence 烟囱 chimney 阳台 balcony 车库 garage
花园 garden 院子 yard 厨房 kitchen 卧室 bedroom 浴室 bathroom 地下室 basement
阁楼 attic 走廊 corridor 房间 room 房子 house 公寓 apartment 家具 furniture
摇篮 cradle 吊床 hammock 长凳 bench 凳子 stool 火柴 match 打火机 lighter
烟灰缸 ashtray 香水 perfume 口红 lipstick 项链 necklace 戒指 ring 耳环 earring
手镯 bracelet 钻石 diamond 珍珠 pearl 黄金 gold 白银 silver 铁 iron 铜 copper
钢 steel 铝 aluminum 木头 wood 石头 stone 塑料 plastic 纸 paper 布 cloth
皮革 leather 棉花 cotton 丝绸 silk 羊毛 wool 橡胶 rubber 纸巾 tissue 餐巾 napkin
桌布 tablecloth 茶杯 teacup 马克杯 mug 托盘 tray 漏斗 funnel 筛子 sieve
搅拌机 blender 烤面包机 toaster 吸尘器 vacuum 衣架 hanger 洗发水 shampoo 牙线 floss
剃刀 razor 书签 bookmark 订书机 stapler 回形针 paperclip 日记 diary 相册 album
壁炉 fireplace 床垫 mattress 木桶 barrel 罐子 jar 罐头 can 盖子 lid 瓶塞 cork
吸管 straw 牙签 toothpick 保温瓶 thermos 绷带 bandage 药 medicine 药片 pill
注射器 syringe 轮椅 wheelchair 拐杖 crutch 手杖 cane

头 head 头发 hair 眼睛 eye 耳朵 ear 鼻子 nose 嘴巴 mouth 嘴唇 lip 牙齿 tooth
舌头 tongue 脸 face 脖子 neck 肩膀 shoulder 手臂 arm 手 hand 手指 finger 拇指 thumb
指甲 fingernail 腿 leg 脚 foot 膝盖 knee 脚趾 toe 脚踝 ankle 手腕 wrist 肘部 elbow
胸部 chest 后背 back 肚子 belly 心脏 heart 肺 lung 肝脏 liver 肾脏 kidney 胃 stomach
大脑 brain 骨头 bone 血液 blood 皮肤 skin 肌肉 muscle 眉毛 eyebrow 睫毛 eyelash
胡子 beard 额头 forehead 下巴 chin 脸颊 cheek 喉咙 throat 腰 waist 臀部 hip
脚跟 heel 手掌 palm 骨骼 skeleton 头骨 skull 神经 nerve 静脉 vein 汗水 sweat

医生 doctor 护士 nurse 老师 teacher 学生 student 警察 policeman 消防员 firefighter
律师 lawyer 法官 judge 工程师 engineer 科学家 scientist 农民 farmer 司机 driver
飞行员 pilot 服务员 waiter 演员 actor 歌手 singer 画家 painter 作家 writer 诗人 poet
记者 journalist 摄影师 photographer 音乐家 musician 舞者 dancer 士兵 soldier
水手 sailor 渔夫 fisherman 木匠 carpenter 铁匠 blacksmith 理发师 barber 裁缝 tailor
面包师 baker 屠夫 butcher 邮递员 postman 秘书 secretary 经理 manager 老板 boss
会计 accountant 银行家 banker 商人 merchant 店主 shopkeeper 建筑师 architect
牙医 dentist 兽医 veterinarian 药剂师 pharmacist 教授 professor 校长 principal
总统 president 国王 king 王后 queen 王子 prince 公主 princess 皇帝 emperor
警卫 guard 侦探 detective 间谍 spy 小偷 thief 强盗 robber 海盗 pirate 骑士 knight
巫师 wizard 魔术师 magician 小丑 clown 运动员 athlete 教练 coach 裁判 referee
翻译 translator 导游 guide 宇航员 astronaut 程序员 programmer 设计师 designer
编辑 editor 图书管理员 librarian 清洁工 cleaner 园丁 gardener 管家 butler
保姆 nanny 猎人 hunter 牧羊人 shepherd 矿工 miner 水管工 plumber 电工 electrician
机械师 mechanic 外科医生 surgeon 和尚 monk 修女 nun 牧师 priest

妈妈 mother 爸爸 father 兄弟 brother 姐妹 sister 儿子 son 女儿 daughter
爷爷 grandfather 奶奶 grandmother 叔叔 uncle 阿姨 aunt 婴儿 baby 孩子 child
男孩 boy 女孩 girl 男人 man 女人 woman 朋友 friend 邻居 neighbor 丈夫 husband
妻子 wife 客人 guest 陌生人 stranger 表哥 cousin 双胞胎 twins 新娘 bride 新郎 groom
英雄 hero 敌人 enemy

学校 school 医院 hospital 银行 bank 图书馆 library 博物馆 museum 公园 park
动物园 zoo 超市 supermarket 市场 market 商店 store 餐厅 restaurant 酒店 hotel
机场 airport 车站 station 港口 harbor 码头 dock 教堂 church 寺庙 temple 城堡 castle
宫殿 palace 监狱 prison 工厂 factory 农场 farm 办公室 office 大学 university
教室 classroom 操场 playground 体育场 stadium 剧院 theater 电影院 cinema 广场 plaza
桥 bridge 隧道 tunnel 街道 street 道路 road 城市 city 村庄 village 小镇 town
国家 country 首都 capital 岛屿 island 沙漠 desert 森林 forest 高山 mountain 山丘 hill
山谷 valley 河流 river 湖泊 lake 海洋 ocean 大海 sea 海滩 beach 瀑布 waterfall
洞穴 cave 火山 volcano 草原 grassland 草地 meadow 田野 field 沼泽 swamp
冰川 glacier 悬崖 cliff 池塘 pond 小溪 creek 溪流 stream 海湾 bay 半岛 peninsula
大陆 continent 丛林 jungle 峡谷 canyon 高原 plateau 盆地 basin 海岸 coast
地平线 horizon 药店 pharmacy 面包店 bakery 书店 bookstore 咖啡馆 cafe 酒吧 bar
诊所 clinic 大使馆 embassy 法院 courthouse 塔 tower 金字塔 pyramid 灯塔 lighthouse
风车 windmill 喷泉 fountain 雕像 statue 纪念碑 monument 墓地 cemetery 帐篷 tent
小屋 cabin 谷仓 barn 仓库 warehouse 实验室 laboratory 健身房 gym 游泳池 pool

电脑 computer 键盘 keyboard 屏幕 screen 显示器 monitor 打印机 printer 扫描仪 scanner
相机 camera 耳机 headphones 麦克风 microphone 扬声器 speaker 充电器 charger
路由器 router 服务器 server 软件 software 硬件 hardware 网络 network
互联网 internet 网站 website 密码 password 电子邮件 email 芯片 chip 处理器 processor
内存 memory 硬盘 disk 数据 data 程序 program 代码 code 算法 algorithm 机器人 robot
无人机 drone 卫星 satellite 火箭 rocket 望远镜 telescope 显微镜 microscope
指南针 compass 温度计 thermometer 磁铁 magnet 变压器 transformer 投影仪 projector
计算器 calculator 平板 tablet 浏览器 browser 数据库 database 文件 file
文件夹 folder 图标 icon 光标 cursor 病毒 virus 电 electricity 电流 current
电压 voltage 发动机 engine 马达 motor 齿轮 gear 轮子 wheel 轮胎 tire 传感器 sensor
天线 antenna 雷达 radar 激光 laser 电梯 elevator 自动扶梯 escalator 发电机 generator
机器 machine 工具 tool 杠杆 lever 滑轮 pulley 链条 chain 开瓶器 opener
手电筒 flashlight 放大镜 magnifier 尺子 ruler 秤 scale

汽车 car 公共汽车 bus 出租车 taxi 卡车 truck 自行车 bicycle 摩托车 motorcycle
火车 train 地铁 subway 飞机 airplane 直升机 helicopter 轮船 ship 小船 boat
潜水艇 submarine 帆船 sailboat 独木舟 canoe 游艇 yacht 救护车 ambulance
拖拉机 tractor 坦克 tank 吉普车 jeep 面包车 van 马车 carriage 滑板 skateboard
雪橇 sled 电车 tram 木筏 raft 飞船 spaceship 轿车 sedan 婴儿车 stroller 手推车 cart

太阳 sun 月亮 moon 星星 star 天空 sky 云 cloud 雨 rain 雪 snow 风 wind 雷 thunder
闪电 lightning 彩虹 rainbow 雾 fog 冰 ice 霜 frost 冰雹 hail 台风 typhoon
飓风 hurricane 龙卷风 tornado 暴风雨 storm 地震 earthquake 洪水 flood 干旱 drought
天气 weather 温度 temperature 春天 spring 夏天 summer 秋天 autumn 冬天 winter
季节 season 早晨 morning 下午 afternoon 晚上 evening 夜晚 night 中午 noon
午夜 midnight 日出 sunrise 日落 sunset 白天 daytime 今天 today 明天 tomorrow
昨天 yesterday 星期 week 月份 month 年 year 小时 hour 分钟 minute 秒 second
世纪 century 树 tree 花 flower 草 grass 叶子 leaf 树枝 branch 树根 root 玫瑰 rose
百合 lily 向日葵 sunflower 郁金香 tulip 菊花 chrysanthemum 荷花 lotus 竹子 bamboo
松树 pine 橡树 oak 柳树 willow 枫树 maple 仙人掌 cactus 苔藓 moss 土壤 soil 泥 mud
沙子 sand 岩石 rock 火 fire 烟 smoke 空气 air 地球 earth 行星 planet 宇宙 universe
银河 galaxy 彗星 comet 流星 meteor 海浪 wave 潮汐 tide 露水 dew 蒸汽 steam
影子 shadow 光 light 黑暗 darkness 自然 nature

红色 red 蓝色 blue 绿色 green 黄色 yellow 黑色 black 白色 white 紫色 purple
粉色 pink 棕色 brown 灰色 gray

书 book 笔 pen 铅笔 pencil 橡皮 eraser 笔记本 notebook 作业 homework 考试 exam
课 lesson 黑板 blackboard 粉笔 chalk 背包 backpack 词典 dictionary 地图 map
地球仪 globe 数学 mathematics 历史 history 地理 geography 物理 physics 化学 chemistry
生物 biology 音乐 music 艺术 art 语言 language 文学 literature 哲学 philosophy
经济 economy 字母表 alphabet 单词 word 句子 sentence 故事 story 小说 novel 诗 poem
杂志 magazine 报纸 newspaper 页 page 毕业 graduation 文凭 diploma 学期 semester
班级 class 分数 score 问题 question 答案 answer 知识 knowledge 实验 experiment
课本 textbook 图画 picture 蜡笔 crayon 颜料 paint 画笔 paintbrush 书桌 desk
信息 information 数字 number 科学 science

足球 football 篮球 basketball 排球 volleyball 网球 tennis 羽毛球 badminton
棒球 baseball 高尔夫 golf 游泳 swimming 跑步 running 滑雪 skiing 拳击 boxing
摔跤 wrestling 击剑 fencing 体操 gymnastics 射箭 archery 冲浪 surfing 马拉松 marathon
比赛 competition 冠军 champion 奖牌 medal 奖杯 trophy 球队 team 球 ball 球拍 racket
球门 goal 象棋 chess 跳棋 checkers 扑克 poker 瑜伽 yoga 舞蹈 dance 橄榄球 rugby
曲棍球 hockey 赛跑 race 健身 fitness 哑铃 dumbbell 头盔 helmet 哨子 whistle
奥运会 olympics

衣服 clothes 衬衫 shirt 裤子 trousers 裙子 skirt 连衣裙 dress 外套 coat 夹克 jacket
毛衣 sweater 帽子 hat 鞋子 shoes 靴子 boots 袜子 socks 手套 gloves 围巾 scarf
领带 tie 腰带 belt 眼镜 glasses 太阳镜 sunglasses 睡衣 pajamas 内衣 underwear
短裤 shorts 牛仔裤 jeans 西装 suit 制服 uniform 雨衣 raincoat 拖鞋 slippers
凉鞋 sandals 运动鞋 sneakers 口袋 pocket 领子 collar 袖子 sleeve 围裙 apron
斗篷 cloak 面具 mask 手帕 handkerchief 背心 vest 王冠 crown 徽章 badge

钢琴 piano 吉他 guitar 小提琴 violin 鼓 drum 笛子 flute 小号 trumpet 萨克斯 saxophone
竖琴 harp 大提琴 cello 口琴 harmonica 手风琴 accordion

歌曲 song 电影 movie 游戏 game 颜色 color 形状 shape 圆圈 circle 三角形 triangle
正方形 square 长方形 rectangle 线条 line 圆点 dot 爱情 love 梦 dream 时间 time
生命 life 死亡 death 和平 peace 战争 war 自由 freedom 真相 truth 希望 hope
幸福 happiness 微笑 smile 笑声 laughter 声音 sound 噪音 noise 回声 echo 味道 taste
气味 smell 名字 name 生日 birthday 婚礼 wedding 节日 festival 假期 holiday
周末 weekend 派对 party 旅程 journey 护照 passport 签证 visa 票 ticket 行李 luggage
手提箱 suitcase 地址 address 工作 job 公司 company 会议 meeting 合同 contract
价格 price 发票 invoice 收据 receipt 税 tax 账单 bill 邮件 mail 新闻 news
广告 advertisement 铃铛 bell 旗帜 flag 世界 world 文化 culture 宗教 religion
政府 government 法律 law 军队 army 海军 navy 武器 weapon 枪 gun 剑 sword
盾牌 shield 弓 bow 箭 arrow 炸弹 bomb 子弹 bullet 大炮 cannon 盔甲 armor
宝藏 treasure 秘密 secret 谜语 riddle 魔法 magic 鬼 ghost 天使 angel 魔鬼 devil
龙 dragon 怪物 monster 巨人 giant 仙女 fairy 独角兽 unicorn 美人鱼 mermaid
吸血鬼 vampire 僵尸 zombie 外星人 alien 灵魂 soul
"""

HAN = re.compile(r"^[\u4e00-\u9fff]+$")
ASCII_WORD = re.compile(r"^[a-z]+$")


def parse(raw):
    toks = raw.split()
    assert len(toks) % 2 == 0, "odd number of tokens"
    pairs = list(zip(toks[0::2], toks[1::2]))
    for x, y in pairs:
        assert HAN.match(x), f"X not Chinese-only: {x!r} ({y!r})"
        assert ASCII_WORD.match(y), f"Y not ^[a-z]+$: {y!r} ({x!r})"
    return pairs


def dedupe(pairs):
    seen_x, seen_y, out = {}, {}, []
    for x, y in pairs:
        if x in seen_x:
            print(f"drop duplicate X: {x} {y} (kept {x} {seen_x[x]})")
            continue
        if y in seen_y:
            print(f"drop duplicate Y: {x} {y} (kept {seen_y[y]} {y})")
            continue
        seen_x[x], seen_y[y] = y, x
        out.append((x, y))
    return out


def main():
    pairs = dedupe(parse(RAW))
    print(f"{len(pairs)} unique candidate pairs")
    assert len(pairs) >= N_TRAIN + N_VAL, "not enough pairs"
    assert MUST_VAL in pairs
    rest = [p for p in pairs if p != MUST_VAL]
    random.Random(20240501).shuffle(rest)
    val = [MUST_VAL] + rest[: N_VAL - 1]
    train = rest[N_VAL - 1 : N_VAL - 1 + N_TRAIN]

    # checks
    assert len(train) == N_TRAIN and len(val) == N_VAL
    both = train + val
    assert len({x for x, _ in both}) == len(both), "X repeated"
    assert len({y for _, y in both}) == len(both), "Y repeated"
    assert MUST_VAL in val and MUST_VAL not in train
    for x, y in both:
        assert HAN.match(x) and ASCII_WORD.match(y)

    here = Path(__file__).resolve().parent.parent / "nanoinfer" / "bench" / "data" / "yangyu"
    for name, rows in (("train.txt", train), ("val.txt", val)):
        (here / name).write_text("".join(f"{x}的杨语是{y}\n" for x, y in rows), encoding="utf-8")
        print(f"wrote {name}: {len(rows)} lines")


if __name__ == "__main__":
    main()
